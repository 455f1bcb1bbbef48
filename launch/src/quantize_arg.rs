//! `--quantize`, shared by `bellows eval` and `bellows generate`.

use bellows_peft::Nf4Options;

/// How to quantize the model's decoder linears while loading (embeddings, norms and `lm_head`
/// stay as stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeArg {
    /// NF4 with double quantization, block size 64 (QLoRA; bitsandbytes' `nf4` defaults).
    Nf4,
}

impl QuantizeArg {
    /// The quantizer options.
    pub fn options(self) -> Nf4Options {
        match self {
            QuantizeArg::Nf4 => Nf4Options::default(),
        }
    }
}
