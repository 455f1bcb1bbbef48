//! The f32 LoRA side path's thin products on AVX-512, block by block of rows.
//!
//! The side path `s·(x·Aᵀ)·Bᵀ` and its gradients are six products with one dimension `r`
//! (the rank, 8–64): `gemm` runs them at a third of its rate on the square ones, and each is a
//! parallel region of its own, with an f32 `[n, d_out]` product written out and added in
//! another pass. Here one parallel region per direction takes blocks of [`BLOCK`] rows and does
//! all of a block's side-path work while its rows are in cache:
//!
//! - forward: `xa = x·Aᵀ` for the block's rows, then `y += (xa·Bᵀ)·s` (two roundings, as the
//!   composition's `y + t·s`);
//! - backward: `dxa = g·B` for the block, `dx += dxa·A`, and the block's partial sums of
//!   `dA = dxaᵀ·x` and `dBᵀ = xaᵀ·g`, which are then added pairwise over the blocks.
//!
//! Each element's sums run over `k` in order with one fused multiply-add per term, as `gemm`'s
//! kernels sum; the token sums of `dA` and `dB` go by blocks, so they differ from one
//! sequential sum by rounding. Blocks depend only on the shapes: results do not depend on the
//! number of threads.
//!
//! Unsafe code: the AVX-512 intrinsics (called after [`super::simd::has_avx512`]) and the raw
//! pointers the micro-kernels address their rows through; [`forward`] and [`backward`] check
//! every slice's length before any kernel runs.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m512, __mmask16, _mm512_add_ps, _mm512_fmadd_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps,
};

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::bf16_gemm::transpose16;
use super::simd::pairwise_sum;

/// Rows per task (and per partial sum of `dA` and `dB`).
const BLOCK: usize = 64;

/// f32 lanes of a vector.
const LANES: usize = 16;

/// Ranks up to this use the kernels; larger ones are not thin.
pub(crate) const MAX_RANK: usize = 64;

/// Sizes of a side path: `n` rows, `x: [n, d_in]`, `A: [r, d_in]`, `B: [d_out, r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub n: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub r: usize,
}

/// Whether the kernels run here: AVX-512 and a rank in `1..=MAX_RANK`.
pub(crate) fn applies(r: usize) -> bool {
    (1..=MAX_RANK).contains(&r) && super::simd::has_avx512()
}

/// `r` rounded up to whole vectors.
fn width(r: usize) -> usize {
    r.div_ceil(LANES) * LANES
}

/// `m: [rows, cols]` row-major transposed and zero-padded into `[cols][width(rows)]`... read as
/// `m[q·cols + k]` into `out[k·w + q]`: the right operand of [`rows_times`] for `lhs · mᵀ`.
fn pack_transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let w = width(rows);
    let mut out = vec![0.0; cols * w];
    transpose_into(m, rows, cols, &mut out, w);
    out
}

/// `m: [k, r]` row-major, zero-padded into `[k][width(r)]`.
fn pack_padded(m: &[f32], k: usize, r: usize) -> Vec<f32> {
    let w = width(r);
    let mut out = vec![0.0; k * w];
    for (dst, src) in out.chunks_exact_mut(w).zip(m.chunks_exact(r)).take(k) {
        dst[..r].copy_from_slice(src);
    }
    out
}

/// `m: [rows, cols]` row-major, transposed into `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    transpose_into(m, rows, cols, &mut out, rows);
    out
}

/// `dst[j·stride + i] = src[i·cols + j]` for `i < rows`, `j < cols`; other elements of `dst`
/// are left as they are. Whole 16×16 blocks are transposed in registers on AVX-512 (element
/// by element, the packing took 6–45 µs a call on the calling thread while the pool's other
/// threads waited), the edges element by element.
///
/// # Panics
/// If `src` holds fewer than `rows × cols` values or `dst` is too short for the last column.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32], stride: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        src.len() >= rows * cols && stride >= rows && dst.len() >= (cols - 1) * stride + rows,
        "transpose of {rows}×{cols} into rows of {stride}: slices too short"
    );
    #[allow(unused_mut)]
    let (mut done_rows, mut done_cols) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx512() {
        (done_rows, done_cols) = (rows / LANES * LANES, cols / LANES * LANES);
        // SAFETY: the CPU has AVX-512 F; the blocks lie inside the checked extents.
        unsafe { transpose_blocks(src, cols, (done_rows, done_cols), dst, stride) };
    }
    for i in 0..rows {
        let from = if i < done_rows { done_cols } else { 0 };
        for j in from..cols {
            dst[j * stride + i] = src[i * cols + j];
        }
    }
}

/// The whole 16×16 blocks of [`transpose_into`]: rows `0..rows` and columns `0..cols`, both
/// multiples of 16.
///
/// # Safety
/// AVX-512 F; `src` holds `rows` rows of `ld` (`≥ cols`) values, `dst` `cols` rows of
/// `stride` (`≥ rows`), the last `rows` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_blocks(
    src: &[f32],
    ld: usize,
    (rows, cols): (usize, usize),
    dst: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::_mm512_storeu_si512;
    // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is a u32.
    let bits = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u32>(), src.len()) };
    for i0 in (0..rows).step_by(LANES) {
        for j0 in (0..cols).step_by(LANES) {
            // SAFETY: rows `i0..i0 + 16` (the last ending inside `src`) from column `j0`.
            let t = unsafe { transpose16(&bits[i0 * ld + j0..], ld) };
            for (j, v) in t.iter().enumerate() {
                // SAFETY: 16 values of row `j0 + j` of `dst` from `i0`, inside it.
                unsafe {
                    _mm512_storeu_si512(dst.as_mut_ptr().add((j0 + j) * stride + i0).cast(), *v)
                };
            }
        }
    }
}

/// The forward side path on `x`'s rows: returns `xa = x·Aᵀ` (`[n, r]`) and adds `(xa·Bᵀ)·s` to
/// `y` (`[n, d_out]`, holding `x·Wᵀ`).
///
/// # Panics
/// If a slice's length disagrees with `sh`, or [`applies`] is false.
pub(crate) fn forward(
    sh: Shape,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    y: &mut [f32],
) -> Vec<f32> {
    let Shape { n, d_in, d_out, r } = sh;
    assert!(
        applies(r),
        "the side-path kernels need AVX-512 and rank 1..={MAX_RANK}"
    );
    assert!(
        x.len() == n * d_in && a.len() == r * d_in && b.len() == d_out * r && y.len() == n * d_out,
        "side path operands of other shapes than {sh:?}"
    );
    let mut xa = vec![0.0; n * r];
    if n == 0 || d_out == 0 {
        return xa;
    }
    // Both read parameters the optimizer wrote a step ago (out of cache: a few µs each),
    // so on two threads.
    let (at, bt) = rayon::join(
        || pack_transposed(a, r, d_in), // [d_in][w]
        || transpose(b, d_out, r),      // [r, d_out]
    );
    y.par_chunks_mut(BLOCK * d_out)
        .zip(xa.par_chunks_mut(BLOCK * r))
        .enumerate()
        .for_each(|(t, (yb, xab))| {
            let rows = xab.len() / r;
            let xb = &x[t * BLOCK * d_in..(t * BLOCK + rows) * d_in];
            // SAFETY: `applies` checked the CPU; `xb` holds `rows` rows of `d_in`, `at`
            // `d_in` packed rows of `width(r)`, `xab` `rows` rows of `r`, `bt` `r` rows of
            // `d_out` and `yb` `rows` rows of `d_out`.
            unsafe {
                rows_times(xb, d_in, rows, &at, r, xab);
                add_rows_times(yb, d_out, s, xab, r, rows, &bt);
            }
        });
    xa
}

/// What [`backward`] reads: the side path's upstream gradient `g` (`dY`, or `dY·s` when the
/// scale was not moved), `B'` (`B` or `s·B`), `A`, `x` and `xa'` (`x·Aᵀ` or `s·x·Aᵀ`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grads<'a> {
    pub g: &'a [f32],
    pub b: &'a [f32],
    pub a: &'a [f32],
    pub x: &'a [f32],
    pub xa: &'a [f32],
}

/// The backward side path: adds `(g·B')·A` to `dx` when given, and returns
/// `dA = (g·B')ᵀ·x` (`[r, d_in]`) and `dB = gᵀ·xa'` (`[d_out, r]`) when wanted.
///
/// # Panics
/// If a slice's length disagrees with `sh`, or [`applies`] is false.
pub(crate) fn backward(
    sh: Shape,
    o: Grads<'_>,
    dx: Option<&mut [f32]>,
    want_da: bool,
    want_db: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let Shape { n, d_in, d_out, r } = sh;
    assert!(
        applies(r),
        "the side-path kernels need AVX-512 and rank 1..={MAX_RANK}"
    );
    assert!(
        o.g.len() == n * d_out
            && o.b.len() == d_out * r
            && o.a.len() == r * d_in
            && o.x.len() == n * d_in
            && o.xa.len() == n * r
            && dx.as_ref().is_none_or(|dx| dx.len() == n * d_in),
        "side path gradients of other shapes than {sh:?}"
    );
    let bp = pack_padded(o.b, d_out, r); // [d_out][w]
    let blocks = n.div_ceil(BLOCK);
    let task = |t: usize, dxb: Option<&mut [f32]>| -> (Vec<f32>, Vec<f32>) {
        let (i0, i1) = (t * BLOCK, ((t + 1) * BLOCK).min(n));
        let rows = i1 - i0;
        let gb = &o.g[i0 * d_out..i1 * d_out];
        let xb = &o.x[i0 * d_in..i1 * d_in];
        let xab = &o.xa[i0 * r..i1 * r];
        let mut dxa = vec![0.0; rows * r];
        let (mut da, mut dbt) = (Vec::new(), Vec::new());
        // SAFETY: `applies` checked the CPU; every slice holds the rows and widths passed with
        // it (`gb`, `dxa`, `xb`, `xab`: `rows` rows; `bp`: `d_out` packed rows; `o.a`: `r`
        // rows of `d_in`; the partials `r` rows of `d_in` / `d_out`).
        unsafe {
            rows_times(gb, d_out, rows, &bp, r, &mut dxa);
            if let Some(dxb) = dxb {
                add_rows_times(dxb, d_in, 1.0, &dxa, r, rows, o.a);
            }
            if want_da {
                da = vec![0.0; r * d_in];
                token_sums(&dxa, r, rows, xb, d_in, &mut da);
            }
            if want_db {
                dbt = vec![0.0; r * d_out];
                token_sums(xab, r, rows, gb, d_out, &mut dbt);
            }
        }
        (da, dbt)
    };
    let parts: Vec<(Vec<f32>, Vec<f32>)> = match dx {
        Some(dx) if n > 0 => dx
            .par_chunks_mut(BLOCK * d_in)
            .enumerate()
            .map(|(t, dxb)| task(t, Some(dxb)))
            .collect(),
        _ => (0..blocks).into_par_iter().map(|t| task(t, None)).collect(),
    };
    let (das, dbts): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    let da = want_da.then(|| pairwise_sum(das, r * d_in));
    let db = want_db.then(|| transpose(&pairwise_sum(dbts, r * d_out), r, d_out));
    (da, db)
}

/// The lanes `0..n` of a vector (`n ≤ 16`).
#[cfg(target_arch = "x86_64")]
fn mask(n: usize) -> __mmask16 {
    if n >= LANES {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// `out[rows, r] = lhs[rows, k] · rp` with `rp` packed `[k][width(r)]` (zero-padded).
///
/// # Safety
/// AVX-512 F; `lhs` holds `rows × k`, `rp` `k × width(r)`, `out` `rows × r` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_times(lhs: &[f32], k: usize, rows: usize, rp: &[f32], r: usize, out: &mut [f32]) {
    debug_assert!(lhs.len() >= rows * k && rp.len() >= k * width(r) && out.len() >= rows * r);
    let (l, rp, o) = (lhs.as_ptr(), rp.as_ptr(), out.as_mut_ptr());
    for (i, eight) in row_groups(rows) {
        // SAFETY: rows `i..i + 8` (or `i`) are inside `lhs` and `out` (the caller's sizes).
        unsafe {
            if eight {
                rows_times_block::<8>(l.add(i * k), k, rp, r, o.add(i * r));
            } else {
                rows_times_block::<1>(l.add(i * k), k, rp, r, o.add(i * r));
            }
        }
    }
}

/// The starts of `rows`' groups of eight, then of the rows left over one by one: `(start,
/// whether eight)`.
fn row_groups(rows: usize) -> impl Iterator<Item = (usize, bool)> {
    let eights = rows / 8 * 8;
    (0..eights)
        .step_by(8)
        .map(|i| (i, true))
        .chain((eights..rows).map(|i| (i, false)))
}

/// [`rows_times`] for `R` rows: `R` accumulators per vector of `r`, one broadcast per row and
/// term.
///
/// # Safety
/// AVX-512 F; `l` addresses `R` rows of `k`, `rp` `k` packed rows, `o` `R` rows of `r`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_times_block<const R: usize>(
    l: *const f32,
    k: usize,
    rp: *const f32,
    r: usize,
    o: *mut f32,
) {
    let w = width(r);
    for c in (0..r).step_by(LANES) {
        let mut acc: [__m512; R] = [_mm512_setzero_ps(); R];
        for kk in 0..k {
            // SAFETY: `kk < k` and `c < w`: inside the packed rows and the row-block.
            unsafe {
                let rv = _mm512_maskz_loadu_ps(0xffff, rp.add(kk * w + c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*l.add(j * k + kk)), rv, *acc);
                }
            }
        }
        let m = mask(r - c);
        for (j, acc) in acc.iter().enumerate() {
            // SAFETY: lanes `c..min(c + 16, r)` of row `j` of `o`.
            unsafe { _mm512_mask_storeu_ps(o.add(j * r + c), m, *acc) };
        }
    }
}

/// `y[rows, m] += (l[rows, r] · rr[r, m])·s`, rounding the product, then its scaling, then
/// the sum, as `y + t·s` does.
///
/// # Safety
/// AVX-512 F; `y` holds `rows × m`, `l` `rows × r`, `rr` `r × m` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_rows_times(
    y: &mut [f32],
    m: usize,
    s: f32,
    l: &[f32],
    r: usize,
    rows: usize,
    rr: &[f32],
) {
    debug_assert!(y.len() >= rows * m && l.len() >= rows * r && rr.len() >= r * m);
    let (yp, lp, rp) = (y.as_mut_ptr(), l.as_ptr(), rr.as_ptr());
    for (i, eight) in row_groups(rows) {
        // SAFETY: rows `i..i + 8` (or `i`) are inside `y` and `l`.
        unsafe {
            if eight {
                add_block::<8>(yp.add(i * m), m, s, lp.add(i * r), r, rp);
            } else {
                add_block::<1>(yp.add(i * m), m, s, lp.add(i * r), r, rp);
            }
        }
    }
}

/// [`add_rows_times`] for `R` rows, a vector of `m` at a time.
///
/// # Safety
/// AVX-512 F; `y` addresses `R` rows of `m`, `l` `R` rows of `r`, `rr` `r` rows of `m`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_block<const R: usize>(
    y: *mut f32,
    m: usize,
    s: f32,
    l: *const f32,
    r: usize,
    rr: *const f32,
) {
    let sv = _mm512_set1_ps(s);
    for v in (0..m).step_by(LANES) {
        let mk = mask(m - v);
        let mut acc: [__m512; R] = [_mm512_setzero_ps(); R];
        for q in 0..r {
            // SAFETY: lanes `v..min(v + 16, m)` of row `q` of `rr`; element `q` of row `j`.
            unsafe {
                let rv = _mm512_maskz_loadu_ps(mk, rr.add(q * m + v));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*l.add(j * r + q)), rv, *acc);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            // SAFETY: lanes `v..min(v + 16, m)` of row `j` of `y`.
            unsafe {
                let p = y.add(j * m + v);
                let t = _mm512_mul_ps(*acc, sv);
                _mm512_mask_storeu_ps(p, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, p), t));
            }
        }
    }
}

/// `out[r, m] = Σ_i l[i, ·]ᵀ ⊗ x[i, ·]` over `rows` rows (`l: [rows, r]`, `x: [rows, m]`): eight
/// of `r` by two vectors of `m` in registers over all rows, in row order.
///
/// # Safety
/// AVX-512 F; `l` holds `rows × r`, `x` `rows × m`, `out` `r × m` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn token_sums(l: &[f32], r: usize, rows: usize, x: &[f32], m: usize, out: &mut [f32]) {
    debug_assert!(l.len() >= rows * r && x.len() >= rows * m && out.len() >= r * m);
    let (lp, xp, op) = (l.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    for q0 in (0..r).step_by(8) {
        let qn = (r - q0).min(8);
        for v in (0..m).step_by(2 * LANES) {
            let (m0, m1) = (mask(m - v), mask(m.saturating_sub(v + LANES)));
            let mut a0: [__m512; 8] = [_mm512_setzero_ps(); 8];
            let mut a1: [__m512; 8] = [_mm512_setzero_ps(); 8];
            for i in 0..rows {
                // SAFETY: lanes of row `i` of `x` under the masks; elements `q0..q0 + qn` of
                // row `i` of `l`.
                unsafe {
                    let x0 = _mm512_maskz_loadu_ps(m0, xp.add(i * m + v));
                    // Past the row's end when `m1` is empty (a masked load reads nothing).
                    let x1 = _mm512_maskz_loadu_ps(m1, xp.wrapping_add(i * m + v + LANES));
                    for q in 0..8 {
                        if q < qn {
                            let b = _mm512_set1_ps(*lp.add(i * r + q0 + q));
                            a0[q] = _mm512_fmadd_ps(b, x0, a0[q]);
                            a1[q] = _mm512_fmadd_ps(b, x1, a1[q]);
                        }
                    }
                }
            }
            for q in 0..qn {
                // SAFETY: row `q0 + q` of `out`, lanes under the masks.
                unsafe {
                    let p = op.add((q0 + q) * m + v);
                    _mm512_mask_storeu_ps(p, m0, a0[q]);
                    _mm512_mask_storeu_ps(p.wrapping_add(LANES), m1, a1[q]);
                }
            }
        }
    }
}

/// Without x86-64 there is no AVX-512: [`applies`] is false and nothing calls these.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn rows_times(_: &[f32], _: usize, _: usize, _: &[f32], _: usize, _: &mut [f32]) {
    unreachable!("applies() is false off x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn add_rows_times(
    _: &mut [f32],
    _: usize,
    _: f32,
    _: &[f32],
    _: usize,
    _: usize,
    _: &[f32],
) {
    unreachable!("applies() is false off x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn token_sums(_: &[f32], _: usize, _: usize, _: &[f32], _: usize, _: &mut [f32]) {
    unreachable!("applies() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::{applies, backward, forward, transpose_into, Grads, Shape};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 577.0)
            .collect()
    }

    /// `l[rows, k] · m` in f64, `m` given as a function of `(k, col)`.
    fn prod64(
        l: &[f32],
        rows: usize,
        k: usize,
        cols: usize,
        m: impl Fn(usize, usize) -> f32,
    ) -> Vec<f64> {
        let mut out = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                out[i * cols + j] = (0..k)
                    .map(|kk| f64::from(l[i * k + kk]) * f64::from(m(kk, j)))
                    .sum();
            }
        }
        out
    }

    fn near(what: &str, got: &[f32], want: &[f64]) {
        near_scaled(what, got, want, &vec![0.0; want.len()]);
    }

    /// Within 2e-5 of `1 + |want| + scale`, `scale` the size of terms that cancelled.
    fn near_scaled(what: &str, got: &[f32], want: &[f64], scale: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(scale).enumerate() {
            let tol = 2e-5 * (1.0 + w.abs() + m);
            assert!((f64::from(g) - w).abs() <= tol, "{what}[{i}]: {g} vs {w}");
        }
    }

    /// Ranks below, at and above a vector (and two), rows that leave a partial block and a
    /// partial group of eight, widths that leave partial vectors.
    const SHAPES: [Shape; 5] = [
        Shape {
            n: 70,
            d_in: 40,
            d_out: 37,
            r: 16,
        },
        Shape {
            n: 9,
            d_in: 33,
            d_out: 50,
            r: 1,
        },
        Shape {
            n: 130,
            d_in: 64,
            d_out: 17,
            r: 20,
        },
        Shape {
            n: 64,
            d_in: 19,
            d_out: 48,
            r: 64,
        },
        Shape {
            n: 37,
            d_in: 24,
            d_out: 20,
            r: 4,
        },
    ];

    /// True (and says so) where the kernels do not run.
    fn no_kernels() -> bool {
        let none = !applies(16);
        if none {
            eprintln!("no AVX-512 here: the side-path kernels do not run");
        }
        none
    }

    /// `base + t·s` in f64, and the size of its two terms (for [`near_scaled`]).
    fn added(base: &[f32], t: &[f64], s: f64) -> (Vec<f64>, Vec<f64>) {
        base.iter()
            .zip(t)
            .map(|(&y, &t)| (f64::from(y) + s * t, f64::from(y).abs() + s * t.abs()))
            .unzip()
    }

    /// What [`backward`] reads for `sh`, from seeds `seed..seed + 5`.
    struct GradOperands {
        g: Vec<f32>,
        b: Vec<f32>,
        a: Vec<f32>,
        x: Vec<f32>,
        xa: Vec<f32>,
    }

    impl GradOperands {
        fn new(sh: Shape, seed: usize) -> Self {
            let Shape { n, d_in, d_out, r } = sh;
            GradOperands {
                g: values(n * d_out, seed),
                b: values(d_out * r, seed + 1),
                a: values(r * d_in, seed + 2),
                x: values(n * d_in, seed + 3),
                xa: values(n * r, seed + 4),
            }
        }

        fn grads(&self) -> Grads<'_> {
            Grads {
                g: &self.g,
                b: &self.b,
                a: &self.a,
                x: &self.x,
                xa: &self.xa,
            }
        }
    }

    #[test]
    fn the_forward_side_path_is_x_at_bt_times_s_added() {
        if no_kernels() {
            return;
        }
        for sh in SHAPES {
            let Shape { n, d_in, d_out, r } = sh;
            let (x, a, b) = (
                values(n * d_in, 1),
                values(r * d_in, 2),
                values(d_out * r, 3),
            );
            let y0 = values(n * d_out, 4);
            let mut y = y0.clone();
            let xa = forward(sh, &x, &a, &b, 2.0, &mut y);
            near("xa", &xa, &prod64(&x, n, d_in, r, |k, q| a[q * d_in + k]));
            let t = prod64(&xa, n, r, d_out, |q, j| b[j * r + q]);
            let (want, terms) = added(&y0, &t, 2.0);
            near_scaled("y", &y, &want, &terms);
        }
    }

    #[test]
    fn the_backward_side_path_gives_dx_da_db() {
        if no_kernels() {
            return;
        }
        for sh in SHAPES {
            let Shape { n, d_in, d_out, r } = sh;
            let ops = GradOperands::new(sh, 5);
            let o = ops.grads();
            let (g, b, a, x, xa) = (&ops.g, &ops.b, &ops.a, &ops.x, &ops.xa);
            let dx0 = values(n * d_in, 10);
            let mut dx = dx0.clone();
            let (da, db) = backward(sh, o, Some(&mut dx), true, true);
            // f64 reference: dxa = g·B, dx += dxa·A, dA = dxaᵀ·x, dB = gᵀ·xa.
            let dxa64 = prod64(g, n, d_out, r, |k, q| b[k * r + q]);
            let dxa: Vec<f32> = dxa64.iter().map(|&v| v as f32).collect();
            let side = prod64(&dxa, n, r, d_in, |q, j| a[q * d_in + j]);
            let (want, terms) = added(&dx0, &side, 1.0);
            near_scaled("dx", &dx, &want, &terms);
            let mut da64 = vec![0.0; r * d_in];
            let mut db64 = vec![0.0; d_out * r];
            for i in 0..n {
                for q in 0..r {
                    for j in 0..d_in {
                        da64[q * d_in + j] += dxa64[i * r + q] * f64::from(x[i * d_in + j]);
                    }
                    for j in 0..d_out {
                        db64[j * r + q] += f64::from(g[i * d_out + j]) * f64::from(xa[i * r + q]);
                    }
                }
            }
            near("dA", &da.expect("dA"), &da64);
            near("dB", &db.expect("dB"), &db64);
            // Only what is wanted, the same values.
            let (da2, db2) = backward(sh, o, None, true, false);
            assert!(db2.is_none());
            let (da3, _) = backward(sh, o, Some(&mut dx0.clone()), true, true);
            assert_eq!(da2, da3);
            let (none, db3) = backward(sh, o, None, false, true);
            assert!(none.is_none() && db3.is_some());
        }
    }

    /// Whole blocks, edges of rows and of columns, a wider destination stride: every element
    /// moved, the destination's padding untouched.
    #[test]
    fn transpose_into_moves_every_element() {
        for (rows, cols, stride) in [
            (16, 16, 16),
            (32, 48, 40),
            (17, 40, 20),
            (3, 5, 3),
            (40, 17, 64),
        ] {
            let src = values(rows * cols, rows + cols);
            let mut dst = vec![7.5; cols * stride];
            transpose_into(&src, rows, cols, &mut dst, stride);
            for j in 0..cols {
                for i in 0..stride {
                    let want = if i < rows { src[i * cols + j] } else { 7.5 };
                    assert_eq!(
                        dst[j * stride + i],
                        want,
                        "{rows}×{cols} ({stride}): [{j}][{i}]"
                    );
                }
            }
        }
    }

    /// The blocks do not depend on the pool: one thread and two give the same bits.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        if no_kernels() {
            return;
        }
        let sh = Shape {
            n: 300,
            d_in: 48,
            d_out: 40,
            r: 16,
        };
        let Shape { n, d_in, d_out, .. } = sh;
        let ops = GradOperands::new(sh, 11);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                let mut dx = vec![0.5; n * d_in];
                let (da, db) = backward(sh, ops.grads(), Some(&mut dx), true, true);
                let mut y = vec![0.25; n * d_out];
                let xa2 = forward(sh, &ops.x, &ops.a, &ops.b, 1.0, &mut y);
                (dx, da, db, y, xa2)
            })
        };
        assert!(run(1) == run(2));
    }
}
