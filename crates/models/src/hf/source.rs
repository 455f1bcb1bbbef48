//! [`CheckpointSource`]: base parameters read from a model folder's safetensors, one tensor at a
//! time, NF4-quantized on the way in when asked, or taken as saved from bitsandbytes 4-bit
//! checkpoints.

use bellows_peft::nf4::quantize_nf4;
use bellows_peft::nf4::{BnbAbsmax, BnbQuantState, BnbTensors, BNB_STATE_SUFFIX};
use bellows_peft::{InitRng, Linear, Nf4Options};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::Dtype;

use super::weights::WeightFiles;
use crate::source::{BaseSource, LinearShape};
use crate::{Error, Result};

/// Reads every base parameter from `files`; quantizable linears are NF4-quantized as they are
/// read when `quantize` is set, so the full-precision model never exists. Linears saved by
/// transformers + bitsandbytes in 4-bit load as NF4 whatever `quantize` says.
#[derive(Debug)]
pub struct CheckpointSource<'a, B: Backend> {
    /// The model's weight files.
    pub files: &'a WeightFiles,
    /// Quantize the quantizable linears.
    pub quantize: Option<Nf4Options>,
    /// Where the tensors live.
    pub device: &'a B::Device,
}

impl<B: Backend> CheckpointSource<'_, B> {
    fn dense<const D: usize>(&self, key: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let h = self.files.read_f32(key, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(h.values, shape),
            self.device,
        ))
    }

    fn bnb_weight(
        &self,
        key: &str,
        (d_in, d_out): (usize, usize),
    ) -> Result<bellows_peft::Nf4Data> {
        let path = self.files.describe();
        let bad = |tensor: &str, message: String| Error::Weights {
            path: path.clone(),
            tensor: tensor.into(),
            message,
        };
        let state_key = format!("{key}{BNB_STATE_SUFFIX}");
        let state = BnbQuantState::parse(&self.files.read_u8(&state_key)?)
            .map_err(|e| bad(&state_key, e.to_string()))?;
        if state.shape != [d_out, d_in] {
            return Err(bad(
                &state_key,
                format!("shape {:?}, expected {:?}", state.shape, [d_out, d_in]),
            ));
        }
        let part = |s: &str| format!("{key}.{s}");
        let absmax = match self.files.dtype(&part("absmax")) {
            Some(Dtype::U8) => BnbAbsmax::Codes(self.files.read_u8(&part("absmax"))?),
            _ => BnbAbsmax::Values(self.files.read_f32_any(&part("absmax"))?.values),
        };
        let nested = |s: &str| -> Result<Option<Vec<f32>>> {
            let k = part(s);
            Ok(match self.files.contains(&k) {
                true => Some(self.files.read_f32_any(&k)?.values),
                false => None,
            })
        };
        let tensors = BnbTensors {
            packed: self.files.read_u8(key)?,
            absmax,
            nested_absmax: nested("nested_absmax")?,
            nested_quant_map: nested("nested_quant_map")?,
            quant_map: self.files.read_f32_any(&part("quant_map"))?.values,
        };
        tensors
            .into_nf4(&state)
            .map_err(|e| bad(key, e.to_string()))
    }
}

impl<B: Backend> BaseSource<B> for CheckpointSource<'_, B> {
    fn linear(
        &mut self,
        path: &str,
        (d_in, d_out, bias): LinearShape,
        quantizable: bool,
        _rng: &mut InitRng,
    ) -> Result<Linear<B>> {
        let key = format!("{path}.weight");
        let bias = match bias {
            true => Some(self.dense(&format!("{path}.bias"), [d_out])?),
            false => None,
        };
        if self.files.contains(&format!("{key}{BNB_STATE_SUFFIX}")) {
            let data = self.bnb_weight(&key, (d_in, d_out))?;
            return Ok(Linear::from_nf4(&data, bias, self.device));
        }
        match self.quantize {
            Some(opts) if quantizable && path != "lm_head" => {
                let h = self.files.read_f32(&key, &[d_out, d_in])?;
                let data = quantize_nf4(&h.values, &[d_out, d_in], opts);
                Ok(Linear::from_nf4(&data, bias, self.device))
            }
            _ => Ok(Linear::from_weight(self.dense(&key, [d_out, d_in])?, bias)),
        }
    }

    fn embedding(
        &mut self,
        path: &str,
        shape: [usize; 2],
        _rng: &mut InitRng,
    ) -> Result<Tensor<B, 2>> {
        self.dense(path, shape)
    }

    fn norm(&mut self, path: &str, d: usize) -> Result<Tensor<B, 1>> {
        self.dense(path, [d])
    }
}
