//! The host kernel of the fused RMSNorm op on f32 rows of width `d`: one pass over `x` forward
//! and one over `(x, dy)` backward, per block of rows on rayon's pool, vectorised
//! ([`bellows_peft::fused::simd`]).
//!
//! With `r = 1/√(Σx²/d + ε)` per row and `n = x·r`: `y = n·w` (or `n` without a gain);
//! `dn = dy·w`, `dx = (dn − n·(Σ dn·n)/d)·r` and `dw = Σ_rows dy·n`. The row sums are lane sums
//! ([`simd::dot`]), so they differ from a sequential sum by rounding. `dw`'s per-block partial
//! sums are added pairwise in block order, and the blocks depend only on `d`: the result does
//! not depend on the number of threads.

use bellows_peft::fused::simd::{self, pairwise_sum, wide};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements per task, rounded to whole rows (at least one).
const CHUNK: usize = 1 << 14;

/// At most this many rows per task: `dw`'s per-task partial sums run over the task's rows in
/// turn, and are then added pairwise ([`pairwise_sum`]), which keeps its rounding close to a
/// pairwise sum over all rows.
const MAX_ROWS: usize = 16;

/// Rows per task for rows of width `d`.
fn rows_per_task(d: usize) -> usize {
    (CHUNK / d.max(1)).clamp(1, MAX_ROWS)
}

/// `r = 1/√(Σx²/d + ε)` of one row.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (simd::dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// `(y, r)` for `x` holding rows of width `d`: `y = (x·r)·w` (`x·r` without `w`), and `r` per
/// row.
pub(crate) fn forward(x: &[f32], w: Option<&[f32]>, d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    debug_assert!(x.len().is_multiple_of(d.max(1)) && w.is_none_or(|w| w.len() == d));
    if x.is_empty() || d == 0 {
        return (Vec::new(), Vec::new());
    }
    let per = rows_per_task(d);
    let rows = x.len() / d;
    // Not zero-filled first (one thread's memset while the others waited): every row is
    // written by its task.
    let mut y: Vec<f32> = Vec::with_capacity(x.len());
    let mut r: Vec<f32> = Vec::with_capacity(rows);
    y.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(per * d)
        .zip(r.spare_capacity_mut()[..rows].par_chunks_mut(per))
        .zip(x.par_chunks(per * d))
        .for_each(|((y, r), x)| {
            wide(
                #[inline(always)]
                || forward_rows(y, r, x, w, d, eps),
            )
        });
    // SAFETY: the chunks cover all rows; `forward_rows` writes every element of `y` and `r`.
    #[allow(unsafe_code)]
    unsafe {
        y.set_len(x.len());
        r.set_len(rows);
    }
    (y, r)
}

/// [`forward`] on one block of rows (inlined into [`wide`]'s AVX-512 build).
#[inline(always)]
fn forward_rows(
    y: &mut [MaybeUninit<f32>],
    r: &mut [MaybeUninit<f32>],
    x: &[f32],
    w: Option<&[f32]>,
    d: usize,
    eps: f32,
) {
    for ((y, r), x) in y.chunks_exact_mut(d).zip(r).zip(x.chunks_exact(d)) {
        let ri = inv_rms(x, eps);
        r.write(ri);
        match w {
            Some(w) => {
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    y.write(x * ri * w);
                }
            }
            None => {
                for (y, &x) in y.iter_mut().zip(x) {
                    y.write(x * ri);
                }
            }
        }
    }
}

/// The inputs of the backward pass: the forward's `x` (rows of width `d`), its `r`, the gain
/// `w` if there was one, and the upstream gradient `dy` (`x`'s shape).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Saved<'a> {
    pub x: &'a [f32],
    pub r: &'a [f32],
    pub w: Option<&'a [f32]>,
    pub dy: &'a [f32],
    pub d: usize,
}

/// `(dx, dw)`, each computed only when wanted (`dw` only where there is a gain).
pub(crate) fn backward(
    s: Saved<'_>,
    want_dx: bool,
    want_dw: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let d = s.d;
    debug_assert!(s.x.len().is_multiple_of(d.max(1)) && s.dy.len() == s.x.len());
    let want_dw = want_dw && s.w.is_some();
    if s.x.is_empty() || d == 0 {
        return (want_dx.then(Vec::new), want_dw.then(|| vec![0.0; d]));
    }
    let per = rows_per_task(d);
    let task = |t: usize, dx: Option<&mut [MaybeUninit<f32>]>| {
        let rows = t * per..((t + 1) * per).min(s.r.len());
        let span = rows.start * d..rows.end * d;
        let block = Saved {
            x: &s.x[span.clone()],
            r: &s.r[rows],
            dy: &s.dy[span],
            ..s
        };
        let mut dw = if want_dw { vec![0.0; d] } else { Vec::new() };
        wide(
            #[inline(always)]
            || backward_rows(block, dx, &mut dw),
        );
        dw
    };
    // `dx` not zero-filled first (one thread's memset while the others waited): every row is
    // written by its task.
    let (dx, partials): (Option<Vec<f32>>, Vec<Vec<f32>>) = if want_dx {
        let chunk = per * d;
        // SAFETY: `backward_rows` writes every element of the chunk it is given.
        #[allow(unsafe_code)]
        let (dx, partials) = unsafe {
            simd::par_written_with(s.x.len(), chunk, |at, dx| task(at / chunk, Some(dx)))
        };
        (Some(dx), partials)
    } else if want_dw {
        let partials = (0..s.r.len().div_ceil(per))
            .into_par_iter()
            .map(|t| task(t, None))
            .collect();
        (None, partials)
    } else {
        (None, Vec::new())
    };
    let dw = want_dw.then(|| pairwise_sum(partials, d));
    (dx, dw)
}

/// [`backward`] on one block of rows: every element of `dx` written when given, `dw` (empty:
/// not wanted) accumulated over the block's rows.
#[inline(always)]
fn backward_rows(s: Saved<'_>, mut dx: Option<&mut [MaybeUninit<f32>]>, dw: &mut [f32]) {
    let d = s.d;
    let (mut n, mut dn) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (i, &r) in s.r.iter().enumerate() {
        let (x, dy) = (&s.x[i * d..(i + 1) * d], &s.dy[i * d..(i + 1) * d]);
        for (n, &x) in n.iter_mut().zip(x) {
            *n = x * r;
        }
        match s.w {
            Some(w) => {
                for ((dn, &dy), &w) in dn.iter_mut().zip(dy).zip(w) {
                    *dn = dy * w;
                }
            }
            None => dn.copy_from_slice(dy),
        }
        for ((dw, &dy), &n) in dw.iter_mut().zip(dy).zip(&n) {
            *dw += dy * n;
        }
        if let Some(dx) = dx.as_deref_mut() {
            let mean = simd::dot(&dn, &n) / d as f32;
            for ((dx, &dn), &n) in dx[i * d..(i + 1) * d].iter_mut().zip(&dn).zip(&n) {
                dx.write((dn - n * mean) * r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{backward, forward, Saved};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 377.0)
            .collect()
    }

    /// Row by row in f64: `(y, dx, dw)`.
    fn reference(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        d: usize,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut y, mut dx, mut dw) = (vec![], vec![], vec![0.0; d]);
        for (x, dy) in x.chunks(d).zip(dy.chunks(d)) {
            let ms = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            let n: Vec<f64> = x.iter().map(|&v| f64::from(v) * r).collect();
            let dn: Vec<f64> = dy.iter().zip(w).map(|(&g, &w)| f64::from(g * w)).collect();
            let mean = dn.iter().zip(&n).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            for j in 0..d {
                y.push(n[j] * f64::from(w[j]));
                dx.push((dn[j] - n[j] * mean) * r);
                dw[j] += f64::from(dy[j]) * n[j];
            }
        }
        (y, dx, dw)
    }

    fn assert_near(what: &str, got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Against an f64 computation, over widths below, at and above the lane count and a row
    /// count that leaves a partial last task.
    #[test]
    fn kernel_matches_an_f64_reference() {
        for (rows, d) in [(3, 5), (70, 16), (9, 48), (41, 520)] {
            let (x, w, dy) = (values(rows * d, 1), values(d, 2), values(rows * d, 3));
            let (y, r) = forward(&x, Some(&w), d, 1e-5);
            let (ry, rdx, rdw) = reference(&x, &w, &dy, d, 1e-5);
            assert_near("y", &y, &ry, 1e-6);
            let s = Saved {
                x: &x,
                r: &r,
                w: Some(&w),
                dy: &dy,
                d,
            };
            let (dx, dw) = backward(s, true, true);
            assert_near("dx", &dx.expect("dx"), &rdx, 1e-5);
            assert_near("dw", &dw.expect("dw"), &rdw, 1e-5);
            // Each gradient alone is the same, and nothing is computed that is not wanted.
            let (dx_only, none) = backward(s, true, false);
            assert!(none.is_none());
            let (none, dw_only) = backward(s, false, true);
            assert!(none.is_none());
            let (dx2, dw2) = backward(s, true, true);
            assert_eq!(dx_only, dx2);
            assert_eq!(dw_only, dw2);
        }
    }

    /// Without a gain: `y = x·r` and `dx` with `dn = dy`; no `dw`.
    #[test]
    fn kernel_without_a_gain_is_the_unit_gain() {
        let (rows, d) = (33, 40);
        let (x, dy) = (values(rows * d, 4), values(rows * d, 5));
        let ones = vec![1.0; d];
        let (y, r) = forward(&x, None, d, 1e-6);
        let (y1, r1) = forward(&x, Some(&ones), d, 1e-6);
        assert_eq!((&y, &r), (&y1, &r1));
        let plain = Saved {
            x: &x,
            r: &r,
            w: None,
            dy: &dy,
            d,
        };
        let (dx, dw) = backward(plain, true, true);
        assert!(dw.is_none());
        let (dx1, _) = backward(
            Saved {
                w: Some(&ones),
                ..plain
            },
            true,
            false,
        );
        assert_eq!(dx, dx1);
    }
}
