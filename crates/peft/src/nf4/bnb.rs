//! bitsandbytes' saved 4-bit state: the `<weight>.quant_state.bitsandbytes__nf4` JSON and the
//! tensors next to it in a transformers checkpoint.

use serde::Deserialize;

use super::data::{Absmax, DoubleQuant, Nf4Data};

fn nf4_err(message: impl Into<String>) -> crate::Error {
    crate::Error::Nf4 {
        message: message.into(),
    }
}

/// Suffixes of the tensors bitsandbytes saves next to a packed 4-bit `weight`.
pub const BNB_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

/// The JSON bitsandbytes stores (as `uint8` bytes) in `<weight>.quant_state.bitsandbytes__nf4`.
/// Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BnbQuantState {
    /// `"nf4"` (bellows reads no other type).
    pub quant_type: String,
    /// Elements per absmax block.
    pub blocksize: usize,
    /// The unquantized dtype, e.g. `"float32"` or `"bfloat16"` (informational).
    #[serde(default)]
    pub dtype: Option<String>,
    /// The weight's shape, `[out, in]`.
    pub shape: Vec<usize>,
    /// Codes per nested block (double quantization only).
    #[serde(default)]
    pub nested_blocksize: Option<usize>,
    /// The nested absmax dtype (double quantization only).
    #[serde(default)]
    pub nested_dtype: Option<String>,
    /// The mean subtracted before double quantization (double quantization only).
    #[serde(default)]
    pub nested_offset: Option<f32>,
}

impl BnbQuantState {
    /// Parses the JSON bytes.
    ///
    /// # Errors
    /// Malformed JSON, a missing key, or a quant type other than `"nf4"`.
    pub fn parse(bytes: &[u8]) -> crate::Result<Self> {
        let s: BnbQuantState = serde_json::from_slice(bytes)
            .map_err(|e| nf4_err(format!("malformed quant state JSON: {e}")))?;
        if s.quant_type != "nf4" {
            return Err(nf4_err(format!(
                "quant_type {:?} is not supported (bellows reads \"nf4\")",
                s.quant_type
            )));
        }
        if s.blocksize == 0 {
            return Err(nf4_err("blocksize 0"));
        }
        Ok(s)
    }

    /// Whether the absmax is double-quantized (`nested_*` keys present).
    pub fn double_quant(&self) -> bool {
        self.nested_offset.is_some() || self.nested_blocksize.is_some()
    }
}

/// The tensors of one bitsandbytes 4-bit weight, read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbTensors {
    /// `<w>`: the packed codes (stored `uint8 [numel/2, 1]`).
    pub packed: Vec<u8>,
    /// `<w>.absmax`: `uint8` codes with double quantization, `f32` values without.
    pub absmax: BnbAbsmax,
    /// `<w>.nested_absmax` (double quantization only).
    pub nested_absmax: Option<Vec<f32>>,
    /// `<w>.nested_quant_map` (double quantization only).
    pub nested_quant_map: Option<Vec<f32>>,
    /// `<w>.quant_map`, 16 entries.
    pub quant_map: Vec<f32>,
}

/// The `absmax` tensor as saved.
#[derive(Debug, Clone, PartialEq)]
pub enum BnbAbsmax {
    /// Double quantization: 8-bit codes.
    Codes(Vec<u8>),
    /// No double quantization: `f32` scales.
    Values(Vec<f32>),
}

impl BnbTensors {
    /// Assembles and checks an [`Nf4Data`] from the saved tensors and their quant state.
    ///
    /// # Errors
    /// A part that disagrees with the state (absmax kind, missing nested tensors, wrong lengths).
    pub fn into_nf4(self, state: &BnbQuantState) -> crate::Result<Nf4Data> {
        let quant_map: [f32; 16] = self.quant_map.as_slice().try_into().map_err(|_| {
            nf4_err(format!(
                "quant_map has {} entries, expected 16",
                self.quant_map.len()
            ))
        })?;
        let absmax = match (self.absmax, state.double_quant()) {
            (BnbAbsmax::Codes(codes), true) => Absmax::Double(DoubleQuant {
                codes,
                nested_absmax: self
                    .nested_absmax
                    .ok_or_else(|| nf4_err("double-quantized state without nested_absmax"))?,
                code_map: self
                    .nested_quant_map
                    .ok_or_else(|| nf4_err("double-quantized state without nested_quant_map"))?,
                offset: state
                    .nested_offset
                    .ok_or_else(|| nf4_err("double-quantized state without nested_offset"))?,
                block_size: state.nested_blocksize.unwrap_or(256),
            }),
            (BnbAbsmax::Values(v), false) => Absmax::Plain(v),
            (BnbAbsmax::Codes(_), false) => {
                return Err(nf4_err(
                    "absmax is uint8 but the state has no nested_* keys",
                ))
            }
            (BnbAbsmax::Values(_), true) => {
                return Err(nf4_err("state is double-quantized but absmax is not uint8"))
            }
        };
        let data = Nf4Data {
            shape: state.shape.clone(),
            block_size: state.blocksize,
            packed: self.packed,
            quant_map,
            absmax,
        };
        data.validate()?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_state_bitsandbytes_writes_and_rejects_fp4() {
        let json = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 96], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.2028, "future": 1}"#;
        let s = BnbQuantState::parse(json).expect("valid");
        assert_eq!(
            (s.blocksize, s.shape.as_slice(), s.double_quant()),
            (64, &[64, 96][..], true)
        );
        let fp4 = br#"{"quant_type": "fp4", "blocksize": 64, "shape": [2, 2]}"#;
        assert!(BnbQuantState::parse(fp4)
            .expect_err("fp4 is rejected")
            .to_string()
            .contains("fp4"));
        assert!(BnbQuantState::parse(b"{")
            .expect_err("truncated JSON is rejected")
            .to_string()
            .contains("malformed"));
    }
}
