//! `[peft.quantization]`: how QLoRA quantizes the frozen base.

use serde::{Deserialize, Serialize};

use super::quantize::Nf4Options;

/// The 4-bit data type. Only NF4 is implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat-4 (QLoRA), bitsandbytes' `"nf4"`.
    #[default]
    Nf4,
}

fn default_block_size() -> usize {
    64
}
fn default_double_quant() -> bool {
    true
}

/// `[peft.quantization]`: quantization of the base model's linear layers (with `method = "qlora"`).
///
/// Embeddings, norms and `lm_head` stay unquantized, as in transformers; so do `modules_to_save`.
/// Maps to transformers' `BitsAndBytesConfig`: `bnb_4bit_quant_type`, the `blocksize` of
/// `quantize_4bit`, and `bnb_4bit_use_double_quant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantConfig {
    /// The 4-bit type: `"nf4"` (the default and only value).
    #[serde(default, rename = "type")]
    pub quant_type: QuantType,
    /// Elements per absmax block over the flattened weight: a power of two from 32 to 4096
    /// (bitsandbytes' range). Default 64.
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Quantize the block scales to 8 bits in blocks of 256 (QLoRA's double quantization:
    /// 4.127 instead of 4.5 bits per parameter at block size 64). Default true.
    #[serde(default = "default_double_quant")]
    pub double_quant: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            quant_type: QuantType::Nf4,
            block_size: default_block_size(),
            double_quant: default_double_quant(),
        }
    }
}

impl QuantConfig {
    /// Pushes every problem as `(dotted key, message)`; `at` is the section prefix
    /// (`"peft.quantization"`).
    pub fn validate(&self, at: &str, out: &mut Vec<(String, String)>) {
        let b = self.block_size;
        if !(b.is_power_of_two() && (32..=4096).contains(&b)) {
            out.push((
                format!("{at}.block_size"),
                format!("must be a power of two from 32 to 4096, got {b}"),
            ));
        }
    }

    /// The quantizer options.
    pub fn options(&self) -> Nf4Options {
        Nf4Options {
            block_size: self.block_size,
            double_quant: self.double_quant,
        }
    }
}
