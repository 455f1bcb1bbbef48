//! How a bf16 product's f32 sums leave the kernel when its result is a bf16 tensor: each
//! rounded to bf16 as Flex's bf16 ops round their results (nearest even,
//! [`super::bits::round_bits`]), optionally after adding a LoRA side path's product the way the
//! composition's bf16 ops add it. Done per output tile while the tile is in cache, instead of
//! writing f32 sums to memory and passing over them again (the `add`, the `scale` and the
//! conversion were three passes over the whole output).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::bits::{round, round_bits};

/// A side path's f32 product `t` (row-major, the output's shape, not yet rounded) and its
/// scale `s` (already rounded as Flex's bf16 scalar ops round it): the result is
/// `r(r(y) + r(r(t)·s))`, the composition's `y + t.mul_scalar(s)` in bf16.
pub type Addend<'a> = Option<(&'a [f32], f32)>;

/// One row of results: `sums` (f32) and the addend's matching row, rounded into `out`'s bf16
/// bits (all three the same length; `out` need not be initialised).
#[inline(always)]
pub fn finish_row(sums: &[f32], add: Option<(&[f32], f32)>, out: &mut [MaybeUninit<u16>]) {
    match add {
        None => {
            for (o, &y) in out.iter_mut().zip(sums) {
                o.write(round_bits(y));
            }
        }
        Some((t, s)) => {
            for ((o, &y), &t) in out.iter_mut().zip(sums).zip(t) {
                o.write(round_bits(round(y) + round(round(t) * s)));
            }
        }
    }
}

/// [`finish_row`] compiled for AVX-512 (the crate's baseline build would run it 4 lanes wide):
/// the packed kernel's path, which runs only where the CPU has these features (callers without
/// them in their own features call it in an `unsafe` block, as for any `target_feature`
/// function).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn finish_row_v4(sums: &[f32], add: Option<(&[f32], f32)>, out: &mut [MaybeUninit<u16>]) {
    finish_row(sums, add, out);
}

/// [`finish_row`] over a whole row-major `[rows, cols]` result, in parallel (the path for a
/// product computed without the bf16 kernel).
pub fn finish_all(sums: &[f32], cols: usize, add: Addend, out: &mut [MaybeUninit<u16>]) {
    let cols = cols.max(1);
    out.par_chunks_mut(cols)
        .zip(sums.par_chunks(cols))
        .enumerate()
        .for_each(|(i, (o, y))| finish_row(y, add.map(|(t, s)| (&t[i * cols..][..o.len()], s)), o));
}
