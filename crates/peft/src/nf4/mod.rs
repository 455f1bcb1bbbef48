//! NF4 quantization (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"),
//! bit-exact with bitsandbytes 0.50, and a frozen NF4 weight for [`crate::Linear`].
//!
//! Format: the weight is flattened row-major and cut into blocks of `block_size` (64) elements;
//! each block stores `absmax = max |w|` and, per element, the index of the nearest of 16
//! NormalFloat levels to `w / absmax`, two indices per byte with the first in the high nibble.
//! Double quantization stores `absmax − mean(absmax)` as 8-bit codes of bitsandbytes' dynamic map
//! in blocks of 256 with one `f32` scale each, plus the mean: `4 + 8/64 + 32/(64·256) = 4.127` bits
//! per parameter. Dequantization: `w = level[code] · absmax[block]`.
//!
//! The host-side code (`codebook`, `data`, `quantize`, `bnb`) is plain Rust over slices; only
//! `weight` and `matmul` use burn.

mod bnb;
mod codebook;
mod config;
mod data;
mod matmul;
mod mean;
mod quantize;
mod weight;

pub use bnb::{BnbAbsmax, BnbQuantState, BnbTensors, BNB_STATE_SUFFIX};
pub use codebook::{dynamic_map, NF4_LEVELS};
pub use config::{QuantConfig, QuantType};
pub use data::{Absmax, DoubleQuant, Nf4Data};
pub use quantize::{double_quantize, quantize_nf4, Nf4Options, NESTED_BLOCK_SIZE};
pub use weight::Nf4Weight;
