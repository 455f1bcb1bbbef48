//! The host kernel of the fused attention op: rotary embedding, grouped-query scaled dot-product
//! attention under a boolean mask, and its backward pass, on f32 slices.
//!
//! Layouts (row-major): `q` is `[batch·seq, heads·head_dim]` and `k`, `v` are
//! `[batch·seq, kv_heads·head_dim]` — the projections' outputs, read in place with strides, so no
//! head transpose is ever materialised; the result has `q`'s layout. The work is split over
//! (batch, head) pairs in the forward pass and (batch, kv head) pairs in the backward pass (each
//! owns the gradient of its key/value head), run on rayon's pool; the products inside are
//! single-threaded `gemm` calls. Query rows go in blocks of [`BLOCK`]; a block only multiplies
//! the key columns some row of it may see, which skips about half of the causal products.
//!
//! Unsafe code: `gemm` takes raw strided pointers, and the per-head tasks write disjoint regions
//! of shared output buffers through raw pointers — buffers not zero-filled first, declared
//! initialised once every task has written its part; each `unsafe` block states its invariant.
#![allow(unsafe_code)]

use bellows_peft::fused::matmul_strided as mm;
use bellows_peft::fused::simd::{self, wide};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Query rows per block.
pub(crate) const BLOCK: usize = 64;

/// Sizes of one attention call (queries and keys have the same length: no cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    /// Sequences in the batch.
    pub b: usize,
    /// Positions per sequence.
    pub s: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (`h` is a multiple).
    pub kv: usize,
    /// Width of a head (even).
    pub hd: usize,
}

impl Dims {
    fn rep(&self) -> usize {
        self.h / self.kv
    }
    fn blocks(&self) -> usize {
        self.s.div_ceil(BLOCK)
    }
}

/// Which keys each query may see: `forbidden[(bi·s + i)·s + j]` is true where query `i` of
/// sequence `bi` must not see key `j`, and the key range `[lo, hi)` outside which every row of a
/// query block is forbidden.
#[derive(Debug, Clone)]
pub(crate) struct Mask {
    forbidden: Vec<bool>,
    ranges: Vec<(usize, usize)>,
}

impl Mask {
    /// From `[b, s, s]` booleans (true = forbidden), with a sliding `window` (query `i` sees
    /// keys `i − window < j`) folded in. `None` when some query may see no key at all, whose
    /// softmax the plain composition defines (as NaN) and this kernel does not.
    pub(crate) fn new(mut forbidden: Vec<bool>, d: Dims, window: Option<usize>) -> Option<Self> {
        let s = d.s;
        assert_eq!(forbidden.len(), d.b * s * s, "mask is [batch, seq, seq]");
        if let Some(w) = window {
            for (r, row) in forbidden.chunks_mut(s).enumerate() {
                let i = r % s;
                for (j, f) in row.iter_mut().enumerate() {
                    *f |= i >= j + w;
                }
            }
        }
        let mut ranges = Vec::with_capacity(d.b * d.blocks());
        for bi in 0..d.b {
            for blk in 0..d.blocks() {
                let (mut lo, mut hi) = (usize::MAX, 0);
                for i in blk * BLOCK..((blk + 1) * BLOCK).min(s) {
                    let row = &forbidden[(bi * s + i) * s..(bi * s + i + 1) * s];
                    let first = row.iter().position(|f| !f)?;
                    let last = row.iter().rposition(|f| !f)?;
                    lo = lo.min(first);
                    hi = hi.max(last + 1);
                }
                ranges.push((lo, hi));
            }
        }
        Some(Mask { forbidden, ranges })
    }

    fn range(&self, d: &Dims, bi: usize, blk: usize) -> (usize, usize) {
        self.ranges[bi * d.blocks() + blk]
    }
}

/// Rotary tables `[b, s, head_dim]`: cos and sin, each half duplicated (Hugging Face layout).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    /// cos(position · inv_freq).
    pub cos: Vec<f32>,
    /// sin(position · inv_freq).
    pub sin: Vec<f32>,
}

/// What the backward pass needs from the forward pass.
#[derive(Debug)]
pub(crate) struct Saved {
    /// Rotated queries `[b, h, s, hd]`.
    qr: Vec<f32>,
    /// Rotated keys `[b, kv, s, hd]`.
    kr: Vec<f32>,
    /// Attention probabilities `[b, h, s, s]` (zero outside the blocks' key ranges).
    p: Vec<f32>,
}

/// A raw pointer that tasks write through at disjoint offsets.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a region no other task touches (see the callers).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `out = x·cos + rotate_half(x)·sin` for one head vector; writes every element of `out`
/// (inlined into [`wide`]'s AVX-512 build).
#[inline(always)]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [MaybeUninit<f32>]) {
    let half = x.len() / 2;
    for d in 0..half {
        out[d].write(x[d] * cos[d] + (-x[d + half]) * sin[d]);
    }
    for d in half..x.len() {
        out[d].write(x[d] * cos[d] + x[d - half] * sin[d]);
    }
}

/// The transpose of [`rotate`]: the gradient of `x` from the gradient `g` of the rotated vector
/// (inlined into [`wide`]'s AVX-512 build where its callers run in it).
#[inline(always)]
fn unrotate(g: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = g.len() / 2;
    for e in 0..half {
        out[e] = g[e] * cos[e] + g[e + half] * sin[e + half];
    }
    for e in half..g.len() {
        out[e] = g[e] * cos[e] - g[e - half] * sin[e - half];
    }
}

/// Softmax of one score row over `[lo, hi)` (relative slice), forbidden entries set to 0;
/// vectorised ([`simd::exp`], lane-wise max and sum; inlined into [`wide`]'s AVX-512 build).
#[inline(always)]
fn softmax_row(row: &mut [f32], forbidden: &[bool]) {
    for (x, &f) in row.iter_mut().zip(forbidden) {
        *x = if f { f32::NEG_INFINITY } else { *x };
    }
    let max = simd::max(row);
    for x in row.iter_mut() {
        *x = simd::exp(*x - max);
    }
    let inv = 1.0 / simd::sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `dP` of one row into `dS = P ⊙ (dP − Σ dP⊙P) · scale` in place; the sum in lanes
/// ([`simd::dot`]: a sequential sum is a chain of dependent additions the compiler may not
/// reorder), inlined into [`wide`]'s AVX-512 build.
#[inline(always)]
fn ds_row(dp: &mut [f32], p: &[f32], scale: f32) {
    let dot = simd::dot(dp, p);
    for (t, &pv) in dp.iter_mut().zip(p) {
        *t = pv * (*t - dot) * scale;
    }
}

/// The gradient of one head's `s` rows before rotation, from `g` (`[s, hd]`, sequence `bi`),
/// written row `i` to `dst + i·stride` through `row` (`hd` scratch) — in [`wide`]'s AVX-512 build.
///
/// # Safety
/// `dst + i·stride .. + hd` for `i < s` must be valid for writes and written by no one else.
unsafe fn unrotate_head(
    g: &[f32],
    bi: usize,
    d: &Dims,
    rope: &Rope,
    row: &mut [f32],
    dst: *mut f32,
    stride: usize,
) {
    let (s, hd) = (d.s, d.hd);
    wide(
        #[inline(always)]
        || {
            for i in 0..s {
                let t = (bi * s + i) * hd;
                unrotate(
                    &g[i * hd..(i + 1) * hd],
                    &rope.cos[t..t + hd],
                    &rope.sin[t..t + hd],
                    row,
                );
                // SAFETY: the caller's contract.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(i * stride), hd) };
            }
        },
    );
}

/// Rotates every `[s, hd]` head of `x` (`[b·s, heads·hd]`) into `[b, heads, s, hd]`.
fn rotate_heads(x: &[f32], heads: usize, d: &Dims, rope: &Rope) -> Vec<f32> {
    let (s, hd) = (d.s, d.hd);
    // SAFETY: each chunk is one head's `s` rows of `hd`, all written by `rotate`.
    unsafe {
        simd::par_written(
            d.b * heads * s * hd,
            s * hd,
            #[inline(always)]
            |at, dst| {
                let task = at / (s * hd);
                let (bi, j) = (task / heads, task % heads);
                for i in 0..s {
                    let row = (bi * s + i) * heads * hd + j * hd;
                    let t = (bi * s + i) * hd;
                    rotate(
                        &x[row..row + hd],
                        &rope.cos[t..t + hd],
                        &rope.sin[t..t + hd],
                        &mut dst[i * hd..(i + 1) * hd],
                    );
                }
            },
        )
    }
}

/// Attention of `q` over `k`, `v` with `scale` (usually `1/√hd`): returns the output
/// `[b·s, h·hd]` and, when `save`, what [`backward`] needs.
pub(crate) fn forward(
    d: Dims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    rope: &Rope,
    mask: &Mask,
    scale: f32,
    save: bool,
) -> (Vec<f32>, Option<Saved>) {
    let (b, s, h, kv, hd) = (d.b, d.s, d.h, d.kv, d.hd);
    assert_eq!(q.len(), b * s * h * hd, "q is [batch·seq, heads·head_dim]");
    assert_eq!(
        k.len(),
        b * s * kv * hd,
        "k is [batch·seq, kv_heads·head_dim]"
    );
    assert_eq!(v.len(), k.len(), "v is k's shape");
    let qr = rotate_heads(q, h, &d, rope);
    let kr = rotate_heads(k, kv, &d, rope);
    // Neither buffer is zero-filled up front (8 MiB of `p` a layer on the small model, which
    // one thread zeroed while the others waited): each task zeroes its probabilities outside
    // the key ranges and the products write the rest, and of `out` the products write all.
    let (np, no) = (b * h * s * s, b * s * h * hd);
    let mut p: Vec<f32> = Vec::with_capacity(np);
    let mut out: Vec<f32> = Vec::with_capacity(no);
    let o = Out(out.as_mut_ptr());
    p.spare_capacity_mut()[..np]
        .par_chunks_mut(s * s)
        .enumerate()
        .for_each(|(task, pt)| {
            let (bi, j) = (task / h, task % h);
            let g = j / d.rep();
            let qh = &qr[task * s * hd..(task + 1) * s * hd];
            let kh = &kr[(bi * kv + g) * s * hd..(bi * kv + g + 1) * s * hd];
            let pt = pt.as_mut_ptr().cast::<f32>();
            for blk in 0..d.blocks() {
                let (r0, r1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(s));
                let (lo, hi) = mask.range(&d, bi, blk);
                let (rows, cols) = (r1 - r0, hi - lo);
                // SAFETY: all regions are inside this task's `s×s` chunk of `p`, `qh`, `kh`,
                // `v` and this task's columns of `out` (head `j` of sequence `bi`), which no
                // other task writes. A row's `[lo, hi)` is read (as a slice or by the second
                // product) only after the first product wrote it.
                unsafe {
                    for i in r0..r1 {
                        pt.add(i * s).write_bytes(0, lo);
                        pt.add(i * s + hi).write_bytes(0, s - hi);
                    }
                    mm(
                        (rows, cols, hd),
                        pt.add(r0 * s + lo),
                        s,
                        false,
                        qh.as_ptr().add(r0 * hd),
                        (hd, 1),
                        kh.as_ptr().add(lo * hd),
                        (1, hd),
                        scale,
                    );
                    for i in r0..r1 {
                        let f = &mask.forbidden[(bi * s + i) * s + lo..(bi * s + i) * s + hi];
                        let row = std::slice::from_raw_parts_mut(pt.add(i * s + lo), cols);
                        wide(
                            #[inline(always)]
                            || softmax_row(row, f),
                        );
                    }
                    mm(
                        (rows, hd, cols),
                        o.at((bi * s + r0) * h * hd + j * hd),
                        h * hd,
                        false,
                        pt.add(r0 * s + lo),
                        (s, 1),
                        v.as_ptr().add((bi * s + lo) * kv * hd + g * hd),
                        (kv * hd, 1),
                        1.0,
                    );
                }
            }
        });
    // SAFETY: every task wrote every row of its chunk of `p` (zeros outside `[lo, hi)`, the
    // first product inside) and, by the second product, rows `0..s` of its head's `hd`
    // columns of `out`; the tasks cover every (sequence, head).
    unsafe {
        p.set_len(np);
        out.set_len(no);
    }
    let saved = save.then_some(Saved { qr, kr, p });
    (out, saved)
}

/// Gradients of `q`, `k`, `v` (their layouts) from the output gradient `dout` (`[b·s, h·hd]`).
pub(crate) fn backward(
    d: Dims,
    saved: &Saved,
    v: &[f32],
    dout: &[f32],
    rope: &Rope,
    mask: &Mask,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, s, h, kv, hd, rep) = (d.b, d.s, d.h, d.kv, d.hd, d.rep());
    assert_eq!(
        dout.len(),
        b * s * h * hd,
        "the output gradient is [batch·seq, heads·head_dim]"
    );
    // Not zero-filled: the tasks copy every row of every head into them (below).
    let (nq, nk) = (b * s * h * hd, b * s * kv * hd);
    let mut dq: Vec<f32> = Vec::with_capacity(nq);
    let mut dk: Vec<f32> = Vec::with_capacity(nk);
    let mut dv: Vec<f32> = Vec::with_capacity(nk);
    let (dq_o, dk_o, dv_o) = (
        Out(dq.as_mut_ptr()),
        Out(dk.as_mut_ptr()),
        Out(dv.as_mut_ptr()),
    );
    (0..b * kv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / kv, task % kv);
        let kh = &saved.kr[task * s * hd..(task + 1) * s * hd];
        let mut dkr = vec![0.0f32; s * hd];
        let mut dvl = vec![0.0f32; s * hd];
        let mut dqr = vec![0.0f32; s * hd];
        let mut tmp = vec![0.0f32; BLOCK * s];
        let mut row = vec![0.0f32; hd];
        for j in g * rep..(g + 1) * rep {
            let qh = &saved.qr[(bi * h + j) * s * hd..(bi * h + j + 1) * s * hd];
            let pt = &saved.p[(bi * h + j) * s * s..(bi * h + j + 1) * s * s];
            let dob = (bi * s) * h * hd + j * hd;
            for blk in 0..d.blocks() {
                let (r0, r1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(s));
                let (lo, hi) = mask.range(&d, bi, blk);
                let (rows, cols) = (r1 - r0, hi - lo);
                // SAFETY: every region lies inside the named buffers; `dout`, `v`, the saved
                // buffers are only read; `tmp`, `dkr`, `dvl`, `dqr` are this task's own.
                unsafe {
                    // dP = dO · Vᵀ
                    mm(
                        (rows, cols, hd),
                        tmp.as_mut_ptr(),
                        cols,
                        false,
                        dout.as_ptr().add(dob + r0 * h * hd),
                        (h * hd, 1),
                        v.as_ptr().add((bi * s + lo) * kv * hd + g * hd),
                        (1, kv * hd),
                        1.0,
                    );
                    // dV += Pᵀ · dO
                    mm(
                        (cols, hd, rows),
                        dvl.as_mut_ptr().add(lo * hd),
                        hd,
                        true,
                        pt.as_ptr().add(r0 * s + lo),
                        (1, s),
                        dout.as_ptr().add(dob + r0 * h * hd),
                        (h * hd, 1),
                        1.0,
                    );
                }
                // dS = P ⊙ (dP − Σ dP⊙P) · scale
                for i in 0..rows {
                    let pr = &pt[(r0 + i) * s + lo..(r0 + i) * s + hi];
                    let tr = &mut tmp[i * cols..(i + 1) * cols];
                    wide(
                        #[inline(always)]
                        || ds_row(tr, pr, scale),
                    );
                }
                unsafe {
                    // dQr = dS · Kr
                    mm(
                        (rows, hd, cols),
                        dqr.as_mut_ptr().add(r0 * hd),
                        hd,
                        false,
                        tmp.as_ptr(),
                        (cols, 1),
                        kh.as_ptr().add(lo * hd),
                        (hd, 1),
                        1.0,
                    );
                    // dKr += dSᵀ · Qr
                    mm(
                        (cols, hd, rows),
                        dkr.as_mut_ptr().add(lo * hd),
                        hd,
                        true,
                        tmp.as_ptr(),
                        (1, cols),
                        qh.as_ptr().add(r0 * hd),
                        (hd, 1),
                        1.0,
                    );
                }
            }
            // SAFETY: head `j` of sequence `bi` belongs to this task (its kv group).
            unsafe { unrotate_head(&dqr, bi, &d, rope, &mut row, dq_o.at(dob), h * hd) };
        }
        let at = (bi * s) * kv * hd + g * hd;
        // SAFETY: kv head `g` of sequence `bi` belongs to this task alone.
        unsafe {
            unrotate_head(&dkr, bi, &d, rope, &mut row, dk_o.at(at), kv * hd);
            for i in 0..s {
                std::ptr::copy_nonoverlapping(
                    dvl.as_ptr().add(i * hd),
                    dv_o.at(at + i * kv * hd),
                    hd,
                );
            }
        }
    });
    // SAFETY: task (bi, g) copied rows `0..s` of query heads `g·rep..(g+1)·rep` into `dq` and
    // of kv head `g` into `dk` and `dv`; the tasks cover every (sequence, kv head).
    unsafe {
        dq.set_len(nq);
        dk.set_len(nk);
        dv.set_len(nk);
    }
    (dq, dk, dv)
}
