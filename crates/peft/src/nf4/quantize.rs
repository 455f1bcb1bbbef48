//! Quantizing `f32` values to NF4, bit-exact with bitsandbytes' `quantize_4bit` (and its double
//! quantization of the block scales).

use super::codebook::{dynamic_map, NF4_LEVELS};
use super::data::{Absmax, DoubleQuant, Nf4Data};
use super::lut::{dynamic_lut, lookup};
use super::mean::torch_mean;

/// Codes per nested block of the double quantization (fixed at 256 in bitsandbytes).
pub const NESTED_BLOCK_SIZE: usize = 256;

/// How to quantize: block size and whether to double-quantize the scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Options {
    /// Elements per absmax block (bitsandbytes' `blocksize`, default 64).
    pub block_size: usize,
    /// Quantize the block scales to 8 bits (bitsandbytes' `compress_statistics` /
    /// `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl Default for Nf4Options {
    /// Block size 64 with double quantization: QLoRA's setting (4.127 bits per parameter).
    fn default() -> Self {
        Nf4Options {
            block_size: 64,
            double_quant: true,
        }
    }
}

/// The NF4 decision boundaries: midpoints of neighbouring levels, computed in `f32` as
/// bitsandbytes does (`(code[:-1] + code[1:]) / 2`).
fn nf4_bounds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) / 2.0)
}

/// The code of `x` (already scaled to [-1, 1]): the number of boundaries strictly below it
/// (`torch.bucketize(x, bounds, right=False)`), so a value on a boundary takes the lower level.
fn nf4_code(bounds: &[f32; 15], x: f32) -> u8 {
    let c = bounds.partition_point(|&b| b < x);
    u8::try_from(c).expect("at most 15 boundaries")
}

/// Quantizes `values` (row-major, of `shape`) to NF4 over the flattened tensor.
///
/// Per block of `opts.block_size` elements: `absmax = max |w|`; each element is scaled to [-1, 1]
/// and mapped to the nearest NF4 level. Exactly as bitsandbytes 0.50's `quantize_4bit`: full
/// blocks multiply by `1 / absmax`, a final short block divides by its absmax (clamped to 1e-38,
/// and stored clamped), and a value exactly between two levels takes the lower one.
///
/// # Panics
/// If `values.len()` differs from the product of `shape` or the block size is 0 (caller bugs).
pub fn quantize_nf4(values: &[f32], shape: &[usize], opts: Nf4Options) -> Nf4Data {
    let n: usize = shape.iter().product();
    assert_eq!(values.len(), n, "values must match the shape {shape:?}");
    assert!(opts.block_size > 0, "block size must be positive");
    let bounds = nf4_bounds();
    let full = n - n % opts.block_size;
    let mut absmax = Vec::with_capacity(n.div_ceil(opts.block_size));
    let mut codes = Vec::with_capacity(n + 1);
    for block in values.chunks(opts.block_size) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        if codes.len() < full {
            let inv = 1.0 / am.max(1e-38);
            codes.extend(
                block
                    .iter()
                    .map(|&v| nf4_code(&bounds, (v * inv).clamp(-1.0, 1.0))),
            );
            absmax.push(am);
        } else {
            let am = am.max(1e-38);
            codes.extend(
                block
                    .iter()
                    .map(|&v| nf4_code(&bounds, (v / am).clamp(-1.0, 1.0))),
            );
            absmax.push(am);
        }
    }
    if codes.len() % 2 == 1 {
        // bitsandbytes pads an odd count with a 0.0 value before packing.
        codes.push(nf4_code(&bounds, 0.0));
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if opts.double_quant {
        Absmax::Double(double_quantize(&absmax, NESTED_BLOCK_SIZE))
    } else {
        Absmax::Plain(absmax)
    };
    Nf4Data {
        shape: shape.to_vec(),
        block_size: opts.block_size,
        packed,
        quant_map: NF4_LEVELS,
        absmax,
    }
}

/// Double quantization of block scales: `offset = mean(absmax)`; `a = absmax − offset` in blocks of
/// `block_size`; per block `nested_absmax = max |a|` and each `a · (1 / nested_absmax)` mapped to an
/// entry of bitsandbytes' dynamic map.
///
/// Exactly as bitsandbytes 0.50 does it on CPU: the offset is summed in the order of PyTorch's CPU
/// `sum` (its `absmax.mean()`), and codes come from bitsandbytes' 65 536-bin lookup table, which
/// near a midpoint between two entries may pick the farther one (see `lut.rs`). A block of zeros
/// gets code 0 and nested absmax 0.
pub fn double_quantize(absmax: &[f32], block_size: usize) -> DoubleQuant {
    let offset = torch_mean(absmax);
    let lut = dynamic_lut();
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let mut codes = Vec::with_capacity(centred.len());
    let mut nested_absmax = Vec::with_capacity(centred.len().div_ceil(block_size));
    for block in centred.chunks(block_size) {
        let nab = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        if nab == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
        } else {
            let inv = 1.0 / nab;
            codes.extend(block.iter().map(|&a| lookup(lut, a * inv)));
        }
        nested_absmax.push(nab);
    }
    DoubleQuant {
        codes,
        nested_absmax,
        code_map: dynamic_map().to_vec(),
        offset,
        block_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_pack_high_nibble_first_and_round_trip_exact_levels() {
        // Values that are exact levels times 2 dequantize exactly.
        let vals: Vec<f32> = [0usize, 15, 7, 3, 9]
            .iter()
            .map(|&c| 2.0 * NF4_LEVELS[c])
            .collect();
        let q = quantize_nf4(
            &vals,
            &[5],
            Nf4Options {
                block_size: 64,
                double_quant: false,
            },
        );
        assert_eq!(q.codes(), vec![0, 15, 7, 3, 9]);
        assert_eq!(q.packed, vec![0x0F, 0x73, 0x97]);
        assert_eq!(q.dequantize(), vals);
    }

    #[test]
    fn a_zero_block_quantizes_to_level_zero() {
        let q = quantize_nf4(&[0.0; 70], &[70], Nf4Options::default());
        assert!(q.codes().iter().all(|&c| c == 7));
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn double_quant_storage_is_about_4_127_bits_per_parameter() {
        // 4 + 8/64 + 32/(64·256) = 4.127, plus the 1 KiB map of each tensor (0.008 bits here).
        let vals: Vec<f32> = (0..1 << 20)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let q = quantize_nf4(&vals, &[vals.len()], Nf4Options::default());
        let bits = 8.0 * (q.storage_bytes() as f64) / vals.len() as f64;
        assert!(bits < 4.14 && bits > 4.127, "{bits}");
        let max_err = q
            .dequantize()
            .iter()
            .zip(&vals)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_err < 0.2, "{max_err}");
    }
}
