//! f32 ↔ bf16 conversions of the fused ops, written branch-free so that their loops vectorise
//! (`half`'s own conversions test for NaN with a branch, which keeps them scalar), each equal
//! bit for bit to the conversion Flex itself applies there:
//! - [`round_bits`]: an op's f32 result to bf16 — `half`'s `bf16::from_f32`, nearest even;
//! - [`cast_bits`]: Flex's `cast` to bf16 — `half`'s `bf16::from_f64` of the exact f64;
//! - [`widen`]: bf16 to f32, exact.

use burn::tensor::bf16;
use rayon::prelude::*;

use super::simd;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `bf16::from_f32(x)` as bits: nearest even; a NaN keeps its payload's top bits and is made
/// quiet.
#[inline(always)]
pub fn round_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// `x` rounded to bf16 and widened back (an op's bf16 result, as f32).
#[inline(always)]
pub fn round(x: f32) -> f32 {
    widen(round_bits(x))
}

/// Flex's f32 → bf16 `cast`, bit for bit: `half`'s `bf16::from_f64` of the exact f64, which
/// truncates the f64 to 20 mantissa bits before rounding to nearest even — for a normal f32,
/// nearest even with its three lowest mantissa bits dropped. (Flex's other bf16 ops round
/// their f32 results with `bf16::from_f32`, [`round_bits`].) Mixed precision casts the f32
/// master weights this way, so the bf16 kernels round f32 operands the same way.
#[inline(always)]
pub fn cast_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let exp = b & 0x7f80_0000;
    if exp != 0 && exp != 0x7f80_0000 {
        let t = b & !7;
        (t.wrapping_add(0x7fff + ((t >> 16) & 1)) >> 16) as u16
    } else {
        bf16::from_f64(f64::from(x)).to_bits()
    }
}

/// [`cast_bits`] of every element of `src` into `dst` (the same length). Rows of normal
/// numbers, zeros and infinities (nearly always all of them) take its branch-free form, which
/// vectorises; a row with a subnormal or a NaN goes element by element.
#[inline(always)]
pub fn cast_row(src: &[f32], dst: &mut [u16]) {
    // An integer OR over the row (vectorises; a `bool` fold or `any` does not).
    let mut odd = 0u32;
    for x in src {
        let b = x.to_bits() & 0x7fff_ffff;
        odd |= u32::from(b > 0x7f80_0000) | u32::from(b.wrapping_sub(1) < 0x007f_ffff);
    }
    if odd != 0 {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = cast_bits(x);
        }
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            let t = x.to_bits() & !7;
            *d = (t.wrapping_add(0x7fff + ((t >> 16) & 1)) >> 16) as u16;
        }
    }
}

/// A bf16 value as f32 (exact; a NaN stays NaN).
#[inline(always)]
pub fn widen(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Every value of `v` as bf16 ([`round_bits`]), in parallel, vectorised ([`simd::map`]).
pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    simd::map(v, |x| bf16::from_bits(round_bits(x)))
}

/// Every value of `v` as bf16 the way Flex's `cast` rounds ([`cast_row`]), in parallel.
pub fn cast_to_bf16(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![0u16; v.len()];
    out.par_chunks_mut(CHUNK)
        .zip(v.par_chunks(CHUNK))
        .for_each(|(o, v)| {
            simd::wide(
                #[inline(always)]
                || cast_row(v, o),
            )
        });
    simd::map(&out, bf16::from_bits)
}

/// Every value of `v` as f32 (exact), in parallel, vectorised ([`simd::map`]).
pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    simd::map(v, |x| widen(x.to_bits()))
}

#[cfg(test)]
mod tests {
    use burn::tensor::bf16;

    use super::{cast_bits, cast_row, round_bits, to_bf16, to_f32, widen};

    /// f32 values around every rounding case of both conversions, and the specials.
    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..1u32 << 16)
            .flat_map(|i| {
                [
                    f32::from_bits(0x3f80_0000 | i),
                    f32::from_bits(0x0001_0000 ^ i.wrapping_mul(40503)),
                    f32::from_bits(0xc2a0_0000 ^ i.wrapping_mul(40503)),
                ]
            })
            .collect();
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffff_ffff),
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x0000_8001),
            f32::from_bits(0x8000_7fff),
        ]);
        v
    }

    /// `want` for every value, a NaN only needing to stay NaN.
    fn check(what: &str, got: impl Fn(f32) -> u16, want: impl Fn(f32) -> u16) {
        for x in values() {
            let (g, w) = (got(x), want(x));
            if x.is_nan() {
                assert!(bf16::from_bits(g).is_nan(), "{what}: {x:?} stays NaN");
            } else {
                assert_eq!(g, w, "{what}: {x:e} ({:#x})", x.to_bits());
            }
        }
    }

    #[test]
    fn conversions_are_halfs_bit_for_bit() {
        check("round_bits", round_bits, |x| bf16::from_f32(x).to_bits());
        check("cast_bits", cast_bits, |x| {
            bf16::from_f64(f64::from(x)).to_bits()
        });
        // Whole rows: mixed (element by element) and normal-only (the branch-free form).
        let v = values();
        let normal: Vec<f32> = v
            .iter()
            .copied()
            .filter(|x| x.is_normal() || *x == 0.0 || x.is_infinite())
            .collect();
        for row in [&v, &normal] {
            let mut bits = vec![0u16; row.len()];
            cast_row(row, &mut bits);
            for (x, b) in row.iter().zip(&bits) {
                if !x.is_nan() {
                    assert_eq!(*b, cast_bits(*x), "cast_row: {x:e}");
                }
            }
        }
        let rounded = to_bf16(&v);
        let back = to_f32(&rounded);
        for ((x, r), w) in v.iter().zip(&rounded).zip(&back) {
            if !x.is_nan() {
                assert_eq!(r.to_bits(), bf16::from_f32(*x).to_bits(), "to_bf16: {x:e}");
                assert_eq!(w.to_bits(), r.to_f32().to_bits(), "to_f32: {x:e}");
            }
        }
        assert_eq!(widen(0x3f80), 1.0);
    }
}
