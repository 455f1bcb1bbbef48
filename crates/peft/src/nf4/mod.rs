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
//! The host-side code (`codebook`, `data`, `quantize`, `mean`, `bnb`) is plain Rust over slices;
//! only `weight`, `matmul` and `host` (the one-pass dequantization on Flex) use burn.
//!
//! ```
//! use bellows_peft::nf4::{quantize_nf4, Nf4Options, Nf4Weight};
//! use bellows_peft::Linear;
//! use burn::backend::Flex;
//! let w: Vec<f32> = (0..8 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0).collect();
//! let q = quantize_nf4(&w, &[8, 64], Nf4Options::default());
//! assert_eq!(q.packed.len(), 8 * 64 / 2);
//! let host = q.dequantize();
//! let dev = Default::default();
//! let device_w = Nf4Weight::<Flex>::from_data(&q, &dev).dequantize();
//! assert_eq!(device_w.into_data().to_vec::<f32>().expect("f32"), host); // bit-exact
//! let layer = Linear::<Flex>::from_nf4(&q, None, &dev);             // a frozen 4-bit base
//! assert!(layer.is_quantized() && layer.d_in() == 64);
//! ```

mod bnb;
mod codebook;
mod config;
mod data;
mod host;
mod lut;
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
