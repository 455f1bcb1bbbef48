//! [`Nf4Weight`]: an NF4-quantized `[out, in]` weight living on the device, dequantized on the fly.

use burn::module::Module;
use burn::tensor::{backend::Backend, DType, ElementConversion, Int, IntDType, Tensor, TensorData};

use super::data::{Absmax, Nf4Data};

/// A frozen NF4 weight `[out, in]` on the device: packed 4-bit codes plus (double-quantized) block
/// scales, never the full-precision weight.
///
/// Every field is a constant, not a [`burn::module::Param`]: parameter walkers, optimizers and
/// checkpoints do not see it, and it has no gradient. [`Nf4Weight::dequantize`] rebuilds the `f32`
/// weight (on Flex in one parallel pass, elsewhere with burn ops: nibble split, code-book
/// lookup, block scaling), bit-exact with [`Nf4Data::dequantize`].
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// Packed codes, `u8 [ceil(n / 2)]`, first element in the high nibble.
    pub packed: Tensor<B, 1, Int>,
    /// The 16 levels, `[16]`.
    pub quant_map: Tensor<B, 1>,
    /// Plain `f32` block scales `[blocks]` (no double quantization).
    pub absmax: Option<Tensor<B, 1>>,
    /// 8-bit codes of the block scales, `u8 [blocks]` (double quantization).
    pub absmax_codes: Option<Tensor<B, 1, Int>>,
    /// Nested scales `[ceil(blocks / nested_block_size)]` (double quantization).
    pub nested_absmax: Option<Tensor<B, 1>>,
    /// The 256-entry dynamic map of the 8-bit codes (double quantization).
    pub code_map: Option<Tensor<B, 1>>,
    /// The mean added back to the dequantized scales (double quantization; 0 otherwise).
    pub offset: f32,
    /// Output features (rows).
    pub d_out: usize,
    /// Input features (columns).
    pub d_in: usize,
    /// Elements per block.
    pub block_size: usize,
    /// Block scales per nested block.
    pub nested_block_size: usize,
}

fn u8_tensor<B: Backend>(v: &[u8], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), (device, DType::U8))
}

fn f32_tensor<B: Backend>(v: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), (device, DType::F32))
}

impl<B: Backend> Nf4Weight<B> {
    /// Uploads host data of a 2-D `[out, in]` tensor.
    ///
    /// # Panics
    /// If `data` is not 2-D or fails [`Nf4Data::validate`] (callers validate first).
    pub fn from_data(data: &Nf4Data, device: &B::Device) -> Self {
        let [d_out, d_in] =
            <[usize; 2]>::try_from(data.shape.as_slice()).expect("an NF4 linear weight is 2-D");
        if let Err(e) = data.validate() {
            panic!("NF4 data must be validated before upload: {e}");
        }
        let (absmax, absmax_codes, nested_absmax, code_map, offset, nested_block_size) =
            match &data.absmax {
                Absmax::Plain(v) => (Some(f32_tensor(v, device)), None, None, None, 0.0, 0),
                Absmax::Double(d) => (
                    None,
                    Some(u8_tensor(&d.codes, device)),
                    Some(f32_tensor(&d.nested_absmax, device)),
                    Some(f32_tensor(&d.code_map, device)),
                    d.offset,
                    d.block_size,
                ),
            };
        Nf4Weight {
            packed: u8_tensor(&data.packed, device),
            quant_map: f32_tensor(&data.quant_map, device),
            absmax,
            absmax_codes,
            nested_absmax,
            code_map,
            offset,
            d_out,
            d_in,
            block_size: data.block_size,
            nested_block_size,
        }
    }

    /// The `f32` block scales `[blocks]`: plain, or `code_map[code] · nested_absmax + offset`.
    pub fn absmax_values(&self) -> Tensor<B, 1> {
        if let Some(a) = &self.absmax {
            return a.clone();
        }
        let (Some(codes), Some(nested), Some(map)) =
            (&self.absmax_codes, &self.nested_absmax, &self.code_map)
        else {
            panic!("an Nf4Weight has plain or double-quantized scales");
        };
        let blocks = codes.dims()[0];
        let nb = nested.dims()[0];
        let scale = nested
            .clone()
            .unsqueeze_dim::<2>(1)
            .repeat_dim(1, self.nested_block_size)
            .reshape([nb * self.nested_block_size])
            .narrow(0, 0, blocks);
        (map.clone().select(0, codes.clone().cast(IntDType::I32)) * scale).add_scalar(self.offset)
    }

    /// The dequantized weight `[out, in]` in `f32` (a new tensor outside any autodiff graph):
    /// on Flex one parallel pass over the packed codes, elsewhere burn ops.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        super::host::try_dequantize(self).unwrap_or_else(|| self.dequantize_ops())
    }

    /// [`Self::dequantize`] with burn ops on any backend: nibble split, code-book lookup,
    /// block scaling.
    pub(crate) fn dequantize_ops(&self) -> Tensor<B, 2> {
        let n = self.d_out * self.d_in;
        let m = self.packed.dims()[0];
        let hi = self
            .packed
            .clone()
            .bitwise_right_shift_scalar(4.elem::<B::IntElem>());
        let lo = self
            .packed
            .clone()
            .bitwise_and_scalar(0x0F.elem::<B::IntElem>());
        let codes = Tensor::stack::<2>(vec![hi, lo], 1)
            .reshape([2 * m])
            .cast(IntDType::I32);
        let values = self.quant_map.clone().select(0, codes);
        let absmax = self.absmax_values();
        let blocks = absmax.dims()[0];
        let total = blocks * self.block_size;
        let values = if 2 * m >= total {
            values.narrow(0, 0, total)
        } else {
            let pad = Tensor::zeros([total - 2 * m], &values.device());
            Tensor::cat(vec![values, pad], 0)
        };
        let w = values.reshape([blocks, self.block_size]) * absmax.unsqueeze_dim(1);
        w.reshape([total])
            .narrow(0, 0, n)
            .reshape([self.d_out, self.d_in])
    }

    /// Bytes held on the device: packed codes, scales, code books and the offset.
    pub fn storage_bytes(&self) -> usize {
        let len = |t: &Option<Tensor<B, 1>>| t.as_ref().map_or(0, |t| 4 * t.dims()[0]);
        self.packed.dims()[0]
            + 4 * self.quant_map.dims()[0]
            + len(&self.absmax)
            + self.absmax_codes.as_ref().map_or(0, |t| t.dims()[0] + 4)
            + len(&self.nested_absmax)
            + len(&self.code_map)
    }

    /// `x · Wᵀ` for `x: [n, in]`, giving `[n, out]`; see `nf4_matmul_t` in `nf4::matmul`.
    pub fn matmul_t(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        super::matmul::nf4_matmul_t(x, self)
    }
}
