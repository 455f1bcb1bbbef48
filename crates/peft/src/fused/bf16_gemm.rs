//! bf16 matrix products with f32 accumulation — what CPU autocast's matmuls compute — on the
//! AVX-512 BF16 dot-product instruction (`vdpbf16ps`: two bf16 products summed into each f32
//! lane, twice the f32 FMA's arithmetic per instruction).
//!
//! Operands are f32 or bf16 views with any (row, column) strides; each element is rounded to
//! bf16 (as Flex's `cast` rounds, [`super::bits::cast_bits`]) while it is packed, so an f32 master
//! weight needs no cast of its own. The packing is the classic one for a dot-product kernel:
//! the left side in panels of [`MR`] rows and the right side in panels of [`NR`] columns, both
//! as 32-bit pairs of consecutive-`k` bf16 values (zero-padded; a `k`-contiguous operand is
//! converted row by row and transposed 16×16 pairs at a time in registers), and a 12×32
//! register-tile kernel runs over blocks of [`KC`] `k` values, the product's tiles spread over
//! the rayon pool.
//!
//! On a CPU without `avx512_bf16` (or another architecture) the same rounded operands go
//! through the f32 `gemm` kernels: the result is the same exact bf16 products summed in f32,
//! up to summation order.
//!
//! Unsafe code: the SIMD kernel and the packing's register transpose (raw pointers into the
//! packed buffers and the output, whose extents the packing fixes) and the per-tile writes into
//! disjoint parts of the output.
#![allow(unsafe_code)]

use std::any::TypeId;
use std::mem::MaybeUninit;
use std::sync::Arc;

use burn::tensor::bf16;
use rayon::prelude::*;

use super::amx;
use super::bits::{cast_bits, cast_row};
#[cfg(not(target_arch = "x86_64"))]
use super::epilogue::finish_row;
#[cfg(target_arch = "x86_64")]
use super::epilogue::finish_row_v4;
use super::epilogue::{finish_all, Addend};
use super::gemm::{check_views, product};
use super::pack_cache::{self, Key, Layout, Owner};

/// Rows of the kernel's register tile.
const MR: usize = 12;
/// Columns of the kernel's register tile (two 16-lane f32 vectors).
const NR: usize = 32;
/// `k` values per block (an even number): a 32-column panel of them is 16 KiB, kept in L1.
const KC: usize = 256;
/// Rows per task: eight row panels, 48 KiB of packed left side per `k` block (L2).
const MC: usize = 8 * MR;
/// Columns per task.
const NC: usize = 8 * NR;
/// Products of at least this many multiply-adds use every core.
const PARALLEL: usize = 64 * 64 * 64;

/// An element a bf16 product can read: its bf16 bit pattern.
pub trait Bf16Operand: Copy + Send + Sync + 'static {
    /// The value as bf16 bits, an f32 rounded as Flex's `cast` rounds it
    /// ([`super::bits::cast_bits`]).
    fn bf16_bits(self) -> u16;

    /// [`Self::bf16_bits`] of every element of `src` into `dst` (the same length).
    #[inline(always)]
    fn row_bits(src: &[Self], dst: &mut [u16]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x.bf16_bits();
        }
    }

    /// A row of `k` values as `k / 2` (rounded up) pairs of bf16 bits, low half the even one,
    /// zero after an odd last value; `bits` is scratch of at least `k + 1` values, zero past `k`.
    #[inline(always)]
    fn row_pairs(src: &[Self], bits: &mut [u16], dst: &mut [u32]) {
        Self::row_bits(src, &mut bits[..src.len()]);
        for (d, two) in dst.iter_mut().zip(bits.chunks_exact(2)) {
            *d = u32::from(two[0]) | (u32::from(two[1]) << 16);
        }
    }
}

impl Bf16Operand for f32 {
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        cast_bits(self)
    }

    /// [`cast_row`]: vectorised for rows without subnormals or NaN.
    #[inline(always)]
    fn row_bits(src: &[f32], dst: &mut [u16]) {
        cast_row(src, dst);
    }
}

impl Bf16Operand for bf16 {
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }

    /// Straight from the values (their bits are already the pairs' halves): no scratch copy.
    #[inline(always)]
    fn row_pairs(src: &[bf16], _: &mut [u16], dst: &mut [u32]) {
        let pairs = src.chunks_exact(2);
        let odd = pairs.remainder().first().map(|x| u32::from(x.to_bits()));
        for (d, two) in dst.iter_mut().zip(pairs) {
            *d = u32::from(two[0].to_bits()) | (u32::from(two[1].to_bits()) << 16);
        }
        if let Some(lo) = odd {
            dst[src.len() / 2] = lo;
        }
    }
}

/// One side of a product: a view of `values` with (row, column) strides and, where the view
/// may be packed once for several products, what owns its storage ([`super::pack_cache`]).
#[derive(Clone, Copy)]
pub struct Operand<'a, T> {
    /// The elements the view reads.
    pub values: &'a [T],
    /// (row, column) strides.
    pub strides: (usize, usize),
    /// The storage's owner: given, the packed view is kept while the storage lives.
    pub owner: Option<&'a Owner>,
}

impl<'a, T> Operand<'a, T> {
    /// A view packed afresh for each product.
    pub fn new(values: &'a [T], strides: (usize, usize)) -> Self {
        Operand {
            values,
            strides,
            owner: None,
        }
    }

    /// The slice's length and the strides, as [`check_views`] takes them.
    fn view(&self) -> (usize, (usize, usize)) {
        (self.values.len(), self.strides)
    }
}

/// The kernel a bf16 product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    /// AMX tiles ([`amx`]).
    Amx,
    /// AVX-512 `vdpbf16ps` (the register-tile `kernel`).
    Dot,
    /// The f32 `gemm` kernels on the rounded operands ([`product_bf16_via_f32`]).
    F32,
}

#[cfg(test)]
thread_local! {
    /// A test's choice of kernel for products called on its thread.
    static TEST_KERNEL: std::cell::Cell<Option<Kernel>> = const { std::cell::Cell::new(None) };
}

/// The fastest kernel this CPU runs ([`amx::available`], then [`has_bf16_dot`]), unless
/// `BELLOWS_BF16_KERNEL` names a slower one (`dot`, `f32`: to compare kernels). Chosen once.
pub(super) fn chosen_kernel() -> Kernel {
    #[cfg(test)]
    if let Some(k) = TEST_KERNEL.get() {
        return k;
    }
    static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let asked = std::env::var("BELLOWS_BF16_KERNEL").ok();
        let (kernel, note) = kernel_for(asked.as_deref(), amx::available(), has_bf16_dot());
        if let Some(note) = note {
            eprintln!("{note}");
        }
        kernel
    })
}

/// The kernel for `BELLOWS_BF16_KERNEL`'s value `asked` on a CPU with or without AMX and
/// `vdpbf16ps`, and what to tell the user when the value is not one of `amx`, `dot`, `f32` or
/// names a kernel this CPU lacks.
fn kernel_for(asked: Option<&str>, amx: bool, dot: bool) -> (Kernel, Option<String>) {
    let fastest = if amx {
        Kernel::Amx
    } else if dot {
        Kernel::Dot
    } else {
        Kernel::F32
    };
    let lacks = |what: &str| {
        Some(format!(
            "BELLOWS_BF16_KERNEL={what}: this CPU has no {what} kernel; using {fastest:?}"
        ))
    };
    match asked.map(str::trim) {
        None | Some("") => (fastest, None),
        Some("amx") if amx => (Kernel::Amx, None),
        Some("amx") => (fastest, lacks("amx")),
        Some("dot") if dot => (Kernel::Dot, None),
        Some("dot") => (fastest, lacks("dot")),
        Some("f32") => (Kernel::F32, None),
        Some(other) => (
            fastest,
            Some(format!(
                "BELLOWS_BF16_KERNEL={other}: not one of amx, dot, f32; using {fastest:?}"
            )),
        ),
    }
}

/// Whether this CPU runs the `vdpbf16ps` kernel (AVX-512 with its BF16 extension).
pub fn has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `round(lhs) · round(rhs)` into a new row-major f32 `[rows, cols]` buffer (products of the
/// bf16-rounded operands summed in f32), `lhs` viewed as `[rows, k]` and `rhs` as `[k, cols]`
/// with the given (row, column) strides.
///
/// # Panics
/// If a view reaches past its slice.
pub fn product_bf16<L: Bf16Operand, R: Bf16Operand>(
    lhs: &[L],
    lhs_strides: (usize, usize),
    rhs: &[R],
    rhs_strides: (usize, usize),
    dims: (usize, usize, usize),
) -> Vec<f32> {
    product_bf16_of(
        Operand::new(lhs, lhs_strides),
        Operand::new(rhs, rhs_strides),
        dims,
    )
}

/// [`product_bf16`] of two [`Operand`]s (packed views kept where an owner is given).
///
/// # Panics
/// If a view reaches past its slice.
pub fn product_bf16_of<L: Bf16Operand, R: Bf16Operand>(
    lhs: Operand<L>,
    rhs: Operand<R>,
    dims: (usize, usize, usize),
) -> Vec<f32> {
    check_views(lhs.view(), rhs.view(), dims);
    let (rows, k, cols) = dims;
    let kernel = chosen_kernel();
    if kernel == Kernel::F32 {
        return product_bf16_via_f32(lhs.values, lhs.strides, rhs.values, rhs.strides, dims);
    }
    if rows * k * cols == 0 {
        return vec![0.0; rows * cols];
    }
    let mut y: Vec<f32> = Vec::with_capacity(rows * cols);
    let out = Out(y.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    packed_product(kernel, lhs, rhs, dims, Dest::F32(out));
    // SAFETY: the tiles cover every row and column, and each tile's first `k` block (which
    // every tile runs since k > 0) stores all of its elements (AMX: each task copies all of
    // its block).
    unsafe { y.set_len(rows * cols) };
    y
}

/// [`product_bf16`] with each sum rounded to bf16 on its way out of the kernel, as Flex's bf16
/// ops round their results — with an addend, `r(r(y) + r(r(t)·s))` (`epilogue`) —
/// into a new row-major `[rows, cols]` bf16 buffer.
///
/// # Panics
/// If a view reaches past its slice, or the addend is not `rows · cols` long.
pub fn product_bf16_rounded<L: Bf16Operand, R: Bf16Operand>(
    lhs: &[L],
    lhs_strides: (usize, usize),
    rhs: &[R],
    rhs_strides: (usize, usize),
    dims: (usize, usize, usize),
    add: Addend,
) -> Vec<bf16> {
    product_bf16_rounded_of(
        Operand::new(lhs, lhs_strides),
        Operand::new(rhs, rhs_strides),
        dims,
        add,
    )
}

/// [`product_bf16_rounded`] of two [`Operand`]s (packed views kept where an owner is given).
///
/// # Panics
/// If a view reaches past its slice, or the addend is not `rows · cols` long.
pub fn product_bf16_rounded_of<L: Bf16Operand, R: Bf16Operand>(
    lhs: Operand<L>,
    rhs: Operand<R>,
    dims: (usize, usize, usize),
    add: Addend,
) -> Vec<bf16> {
    check_views(lhs.view(), rhs.view(), dims);
    let (rows, k, cols) = dims;
    if let Some((t, _)) = add {
        assert_eq!(t.len(), rows * cols, "the addend has the product's shape");
    }
    let kernel = chosen_kernel();
    if kernel == Kernel::F32 || rows * k * cols == 0 {
        return rounded_via_f32(lhs.values, lhs.strides, rhs.values, rhs.strides, dims, add);
    }
    // SAFETY: the kernel's tiles cover every row and column, and each tile's rows are
    // finished into the output.
    unsafe {
        bf16_filled(rows * cols, |out| {
            packed_product(kernel, lhs, rhs, dims, Dest::Bf16(out, add))
        })
    }
}

/// A new bf16 buffer of `len` values, written by `fill` through its raw pointer.
///
/// # Safety
/// `fill` must store all `len` values.
unsafe fn bf16_filled(len: usize, fill: impl FnOnce(Out<MaybeUninit<u16>>)) -> Vec<bf16> {
    let mut y: Vec<bf16> = Vec::with_capacity(len);
    // `bf16` is a transparent `u16`.
    fill(Out(y.spare_capacity_mut().as_mut_ptr().cast()));
    // SAFETY: the caller's promise.
    unsafe { y.set_len(len) };
    y
}

/// A LoRA side path's product `t = lhs · rhs` (`[rows, k] · [k, cols]`, bf16 operands) that a
/// bf16 product adds to its sums as `r(r(y) + r(r(t)·scale))` ([`super::epilogue`]).
#[derive(Clone, Copy)]
pub struct Side<'a> {
    /// The left side, `[rows, k]`.
    pub lhs: Operand<'a, bf16>,
    /// The right side, `[k, cols]`.
    pub rhs: Operand<'a, bf16>,
    /// The side product's inner size (the adapter's rank).
    pub k: usize,
    /// The scale `t` is multiplied by (already rounded as Flex's bf16 scalar ops round it).
    pub scale: f32,
}

/// [`product_bf16_rounded_of`] with the addend a side product: on AMX computed block by block
/// inside the main product's tasks, so its f32 `[rows, cols]` is never written out and read
/// back; on the other kernels computed first. The same sums either way.
///
/// # Panics
/// If a view reaches past its slice.
pub fn product_bf16_side_of<L: Bf16Operand, R: Bf16Operand>(
    lhs: Operand<L>,
    rhs: Operand<R>,
    dims: (usize, usize, usize),
    side: Side,
) -> Vec<bf16> {
    let (rows, k, cols) = dims;
    check_views(side.lhs.view(), side.rhs.view(), (rows, side.k, cols));
    if chosen_kernel() != Kernel::Amx || rows * k * cols * side.k == 0 {
        let t = product_bf16_of(side.lhs, side.rhs, (rows, side.k, cols));
        return product_bf16_rounded_of(lhs, rhs, dims, Some((&t, side.scale)));
    }
    check_views(lhs.view(), rhs.view(), dims);
    let par = rows * k * cols >= PARALLEL;
    // SAFETY: the tasks cover every row and column and finish each of their rows.
    unsafe {
        bf16_filled(rows * cols, |out| {
            amx::product(lhs, rhs, dims, Dest::Bf16(out, None), par, Some(side))
        })
    }
}

/// [`product_bf16_rounded`] without the bf16 kernel: [`product_bf16_via_f32`], then the same
/// rounding as a pass of its own.
fn rounded_via_f32<L: Bf16Operand, R: Bf16Operand>(
    lhs: &[L],
    lhs_strides: (usize, usize),
    rhs: &[R],
    rhs_strides: (usize, usize),
    dims: (usize, usize, usize),
    add: Addend,
) -> Vec<bf16> {
    let sums = product_bf16_via_f32(lhs, lhs_strides, rhs, rhs_strides, dims);
    let mut y: Vec<bf16> = Vec::with_capacity(sums.len());
    // SAFETY: `bf16` is a transparent `u16`; the capacity holds `sums.len()` values.
    let out = unsafe {
        std::slice::from_raw_parts_mut(
            y.spare_capacity_mut()
                .as_mut_ptr()
                .cast::<MaybeUninit<u16>>(),
            sums.len(),
        )
    };
    finish_all(&sums, dims.2, add, out);
    // SAFETY: `finish_all` stored every element.
    unsafe { y.set_len(sums.len()) };
    y
}

/// The fallback: both operands rounded into contiguous f32 copies, then the f32 kernels.
pub fn product_bf16_via_f32<L: Bf16Operand, R: Bf16Operand>(
    lhs: &[L],
    (lrs, lcs): (usize, usize),
    rhs: &[R],
    (rrs, rcs): (usize, usize),
    (rows, k, cols): (usize, usize, usize),
) -> Vec<f32> {
    let widen = |b: u16| f32::from_bits(u32::from(b) << 16);
    let l: Vec<f32> = (0..rows * k)
        .map(|i| widen(lhs[(i / k) * lrs + (i % k) * lcs].bf16_bits()))
        .collect();
    let r: Vec<f32> = (0..k * cols)
        .map(|i| widen(rhs[(i / cols) * rrs + (i % cols) * rcs].bf16_bits()))
        .collect();
    product(&l, (k, 1), &r, (cols, 1), (rows, k, cols))
}

/// Runs `f` over `0..n` on the pool when `par`, on this thread otherwise.
pub(super) fn for_each(par: bool, n: usize, f: impl Fn(usize) + Send + Sync) {
    if par {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// An operand's view (`[rows, k]` with the operand's strides as given) packed in `layout`
/// ([`pack`] or [`amx::pack_rows`]), kept for later products when the operand has an owner.
pub(super) fn pack_operand<T: Bf16Operand + 'static>(
    v: Operand<T>,
    strides: (usize, usize),
    (rows, k): (usize, usize),
    layout: Layout,
    par: bool,
) -> Arc<Vec<u32>> {
    let make = || match layout {
        Layout::Panels {
            width,
            pairs,
            panels,
        } => pack(v.values, strides, (rows, k), width, (pairs, panels), par),
        Layout::RowTiles => amx::pack_rows(v.values, strides, (rows, k), par),
    };
    match v.owner {
        None => Arc::new(make()),
        Some(owner) => {
            let key = Key {
                addr: v.values.as_ptr() as usize,
                len: v.values.len(),
                elem: TypeId::of::<T>(),
                strides,
                rows,
                k,
                layout,
            };
            pack_cache::packed(key, owner, make)
        }
    }
}

/// The `vdpbf16ps` kernel's unpadded panels of `width` rows.
fn panels(width: usize) -> Layout {
    Layout::Panels {
        width,
        pairs: 1,
        panels: 1,
    }
}

/// `v`'s `[rows, k]` view packed in panels of `width` rows: `[panel][k / 2][width]` pairs of
/// consecutive-`k` bf16 values (low half the even `k`), zero beyond the view, with the pairs
/// per panel padded to a multiple of `pad.0` and the panels to a multiple of `pad.1`.
fn pack<T: Bf16Operand>(
    v: &[T],
    strides: (usize, usize),
    (rows, k): (usize, usize),
    width: usize,
    pad: (usize, usize),
    par: bool,
) -> Vec<u32> {
    let kpp = k.div_ceil(2).next_multiple_of(pad.0);
    let panels = rows.div_ceil(width);
    let len = panels.next_multiple_of(pad.1) * kpp * width;
    let view = View {
        strides,
        rows,
        k,
        width,
    };
    // Asked once per operand, not once per panel.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let v4 = has_bf16_dot();
    let fill = |p: usize, panel: &mut [u32]| {
        if p >= panels {
            return; // padding: stays zero
        }
        #[cfg(target_arch = "x86_64")]
        if v4 {
            // SAFETY: the CPU has the features `fill_panel_v4` is compiled for.
            unsafe { fill_panel_v4(v, view, p, panel) };
            return;
        }
        fill_panel(v, view, p, panel);
    };
    panels_filled(len, kpp * width, par, fill)
}

/// A zeroed buffer of `len` values in panels of `panel`, `fill(panel index, panel)` run on
/// each: on the pool when `par`, each task zeroing its own panel first (one thread's memset of
/// the whole buffer kept the others waiting), else on this thread.
pub(super) fn panels_filled(
    len: usize,
    panel: usize,
    par: bool,
    fill: impl Fn(usize, &mut [u32]) + Sync,
) -> Vec<u32> {
    if par && len > 0 {
        super::simd::par_filled(len, panel, 0, fill)
    } else {
        let mut out = vec![0u32; len];
        out.chunks_mut(panel.max(1))
            .enumerate()
            .for_each(|(p, c)| fill(p, c));
        out
    }
}

/// A `[rows, k]` view with (row, column) strides, packed `width` rows per panel.
#[derive(Clone, Copy)]
pub(super) struct View {
    pub(super) strides: (usize, usize),
    pub(super) rows: usize,
    pub(super) k: usize,
    pub(super) width: usize,
}

/// [`fill_panel`] compiled for AVX-512, so its conversion loops are vectorised; a view whose
/// rows are `k`-contiguous (the usual case: `x`, and `W` read as `Wᵀ`) is converted row by
/// row and then transposed 16×16 pairs at a time in registers, instead of scattering each
/// pair to its own cache line.
///
/// # Safety
/// The CPU must have `avx512f`, `avx512bw` and `avx512vl`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn fill_panel_v4<T: Bf16Operand>(v: &[T], view: View, p: usize, panel: &mut [u32]) {
    let View {
        strides: (along, across),
        rows,
        k,
        width,
    } = view;
    if across != 1 || along == 1 {
        fill_panel(v, view, p, panel);
        return;
    }
    let kp = k.div_ceil(2);
    let n = width.min(rows - p * width);
    let first = p * width * along;
    // Rows of pairs, zero-padded to whole 16×16 blocks.
    let (rows16, kp16) = (n.div_ceil(16) * 16, kp.div_ceil(16) * 16);
    let mut pairs = vec![0u32; rows16 * kp16];
    let mut bits = vec![0u16; 2 * kp];
    for (i, dst) in pairs.chunks_exact_mut(kp16).take(n).enumerate() {
        T::row_pairs(&v[first + i * along..][..k], &mut bits, &mut dst[..kp]);
    }
    for g in (0..n).step_by(16) {
        let lanes = (n - g).min(16);
        let mask = ((1u32 << lanes) - 1) as u16;
        for b in (0..kp).step_by(16) {
            // SAFETY: `pairs` holds rows g..g + 16 of kp16 ≥ b + 16 pairs each.
            let cols = unsafe { transpose16(&pairs[g * kp16 + b..], kp16) };
            for (j, col) in cols.iter().enumerate().take(kp - b) {
                let at = (b + j) * width + g;
                debug_assert!(at + lanes <= panel.len());
                // SAFETY: panel row b + j < kp holds `width` ≥ g + lanes values.
                unsafe {
                    std::arch::x86_64::_mm512_mask_storeu_epi32(
                        panel.as_mut_ptr().add(at).cast(),
                        mask,
                        *col,
                    )
                };
            }
        }
    }
}

/// The 16×16 block of `u32` at `m` (row stride `stride`) transposed: vector `j` holds column
/// `j` (rows 0..16). Three rounds of interleaves: 32-bit, 64-bit, then 128-bit lanes.
///
/// # Safety
/// `m` must hold 15·`stride` + 16 values; the CPU must have `avx512f`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16(m: &[u32], stride: usize) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    debug_assert!(m.len() >= 15 * stride + 16);
    // SAFETY: 16 rows of 16 values, inside `m` (the caller's bound).
    let r: [__m512i; 16] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_si512(m.as_ptr().add(i * stride).cast()) });
    // t[2i] lane L: r[2i][4L], r[2i+1][4L], r[2i][4L+1], r[2i+1][4L+1]; t[2i+1]: columns 4L+2, 4L+3.
    let t: [__m512i; 16] = std::array::from_fn(|x| {
        let (a, b) = (r[x & !1], r[x | 1]);
        if x % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // u[4i + c] lane L: column 4L + c, rows 4i..4i + 4.
    let u: [__m512i; 16] = std::array::from_fn(|x| {
        let (i, c) = (x / 4, x % 4);
        let (a, b) = (t[4 * i + c / 2], t[4 * i + 2 + c / 2]);
        if c % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // Column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let v_lo = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
        let v_hi = _mm512_shuffle_i32x4::<0xdd>(u[c], u[4 + c]);
        let w_lo = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let w_hi = _mm512_shuffle_i32x4::<0xdd>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(v_lo, w_lo);
        out[8 + c] = _mm512_shuffle_i32x4::<0xdd>(v_lo, w_lo);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(v_hi, w_hi);
        out[12 + c] = _mm512_shuffle_i32x4::<0xdd>(v_hi, w_hi);
    }
    out
}

/// Panel `p` of [`pack`].
#[inline(always)]
pub(super) fn fill_panel<T: Bf16Operand>(v: &[T], view: View, p: usize, panel: &mut [u32]) {
    let View {
        strides: (along, across),
        rows,
        k,
        width,
    } = view;
    let kp = k.div_ceil(2);
    let n = width.min(rows - p * width);
    let first = p * width * along;
    if along == 1 {
        // A panel's rows are adjacent in memory for each `k`: convert the two `k` rows of a
        // pair, then interleave them.
        let (mut even, mut odd) = (vec![0u16; n], vec![0u16; n]);
        for (q, dst) in panel.chunks_exact_mut(width).take(kp).enumerate() {
            T::row_bits(&v[first + 2 * q * across..][..n], &mut even);
            if 2 * q + 1 < k {
                T::row_bits(&v[first + (2 * q + 1) * across..][..n], &mut odd);
            } else {
                odd.fill(0);
            }
            for ((d, &lo), &hi) in dst.iter_mut().zip(&even).zip(&odd) {
                *d = u32::from(lo) | (u32::from(hi) << 16);
            }
        }
    } else if across == 1 {
        // Each row's `k` values are contiguous: convert the row, then spread its pairs.
        let mut bits = vec![0u16; 2 * kp];
        for i in 0..n {
            T::row_bits(&v[first + i * along..][..k], &mut bits[..k]);
            for (q, two) in bits.chunks_exact(2).enumerate() {
                panel[q * width + i] = u32::from(two[0]) | (u32::from(two[1]) << 16);
            }
        }
    } else {
        for i in 0..n {
            for q in 0..kp {
                let lo = v[first + i * along + 2 * q * across].bf16_bits();
                let hi = if 2 * q + 1 < k {
                    v[first + i * along + (2 * q + 1) * across].bf16_bits()
                } else {
                    0
                };
                panel[q * width + i] = u32::from(lo) | (u32::from(hi) << 16);
            }
        }
    }
}

/// A raw output pointer, shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
pub(super) struct Out<T>(*mut T);
// SAFETY: each task writes its own tile of the output only.
unsafe impl<T> Send for Out<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the bare pointer).
    pub(super) fn ptr(self) -> *mut T {
        self.0
    }
}

/// Where the packed path's results go: f32 sums straight into the output, or each tile's sums
/// into a scratch tile that [`super::epilogue::finish_row`] rounds into bf16 bits (with the addend).
#[derive(Clone, Copy)]
pub(super) enum Dest<'a> {
    F32(Out<f32>),
    Bf16(Out<MaybeUninit<u16>>, Addend<'a>),
}

/// The packed path on kernel `on` (the caller checked the views, the addend and the CPU), for a
/// product with rows, `k` and columns all non-zero.
fn packed_product<L: Bf16Operand, R: Bf16Operand>(
    on: Kernel,
    lhs: Operand<L>,
    rhs: Operand<R>,
    (rows, k, cols): (usize, usize, usize),
    dest: Dest,
) {
    let par = rows * k * cols >= PARALLEL;
    if on == Kernel::Amx {
        amx::product(lhs, rhs, (rows, k, cols), dest, par, None);
        return;
    }
    let kp = k.div_ceil(2);
    // The right side's columns are its "rows" for packing: column j is `rhs[.., j]`.
    let (lrs, lcs) = lhs.strides;
    let (rrs, rcs) = rhs.strides;
    let a = pack_operand(lhs, (lrs, lcs), (rows, k), panels(MR), par);
    let b = pack_operand(rhs, (rcs, rrs), (cols, k), panels(NR), par);
    let (row_tiles, col_tiles) = (rows.div_ceil(MC), cols.div_ceil(NC));
    for_each(par, row_tiles * col_tiles, |t| {
        let (ti, tj) = (t / col_tiles, t % col_tiles);
        let (r0, r1) = (ti * MC, (ti * MC + MC).min(rows));
        let (c0, c1) = (tj * NC, (tj * NC + NC).min(cols));
        // Not zero-filled: the first `k` block's kernel calls store every element.
        let mut scratch: Vec<f32> = Vec::new();
        let (base, ld) = match dest {
            // SAFETY: (r0, c0) lies in the output.
            Dest::F32(out) => (unsafe { out.ptr().add(r0 * cols + c0) }, cols),
            Dest::Bf16(..) => {
                scratch.reserve_exact(MC * NC);
                (scratch.as_mut_ptr(), NC)
            }
        };
        for q0 in (0..kp).step_by(KC / 2) {
            let qn = (kp - q0).min(KC / 2);
            for c in (c0..c1).step_by(NR) {
                let bp = &b[(c / NR) * kp * NR + q0 * NR..][..qn * NR];
                for r in (r0..r1).step_by(MR) {
                    let ap = &a[(r / MR) * kp * MR + q0 * MR..][..qn * MR];
                    // SAFETY: the tile [r, r + MR) × [c, c + NR), clipped to this task's
                    // rows and columns, lies in the output (or the task's own scratch tile
                    // of MC × NC) and belongs to this task alone; `ap` and `bp` hold `qn`
                    // packed pairs of MR and NR values.
                    unsafe {
                        kernel(
                            qn,
                            ap,
                            bp,
                            base.add((r - r0) * ld + (c - c0)),
                            ld,
                            (r1 - r).min(MR),
                            (c1 - c).min(NR),
                            q0 > 0,
                        );
                    }
                }
            }
        }
        if let Dest::Bf16(out, add) = dest {
            let w = c1 - c0;
            for i in r0..r1 {
                // SAFETY: the first `k` block stored this row of the scratch tile; the
                // output row's [c0, c1) belongs to this task alone.
                let (sums, row) = unsafe {
                    (
                        std::slice::from_raw_parts(base.add((i - r0) * ld), w),
                        std::slice::from_raw_parts_mut(out.ptr().add(i * cols + c0), w),
                    )
                };
                let add = add.map(|(t, s)| (&t[i * cols + c0..][..w], s));
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the packed path runs only on CPUs with AVX-512 (`has_bf16_dot`).
                unsafe {
                    finish_row_v4(sums, add, row)
                };
                #[cfg(not(target_arch = "x86_64"))]
                finish_row(sums, add, row);
            }
        }
    });
}

/// One register tile: `c[rows × cols] (+)= Σ_q a[q] ⊗ b[q]` over `qn` packed pairs.
///
/// # Safety
/// `c` must address `rows ≤ MR` rows of `cols ≤ NR` values with row stride `ldc`, writable by
/// this caller alone, and the CPU must have `avx512f` and `avx512bf16`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    qn: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= qn * MR && b.len() >= qn * NR);
    let (a, b) = (a.as_ptr(), b.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for q in 0..qn {
        // SAFETY: `q < qn`, and the packed slices hold `qn` pairs of MR and NR values; the
        // bf16 vectors are the same 512 bits reinterpreted.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16).cast()));
            let ap = a.add(q * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
    }
    let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    let masks = [lanes(cols), lanes(cols.saturating_sub(16))];
    for (i, acc) in acc.iter().enumerate() {
        if i >= rows {
            break;
        }
        for h in 0..2 {
            if masks[h] == 0 {
                continue;
            }
            // SAFETY: row `i < rows` and the masked lanes `< cols` are inside the tile.
            unsafe {
                let p = c.add(i * ldc + 16 * h);
                let mut v = acc[h];
                if accumulate {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], p));
                }
                _mm512_mask_storeu_ps(p, masks[h], v);
            }
        }
    }
}

/// Not reached: [`has_bf16_dot`] is false off x86-64.
#[allow(clippy::too_many_arguments)]
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(
    _: usize,
    _: &[u32],
    _: &[u32],
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("the bf16 kernel runs only where has_bf16_dot() is true")
}

#[cfg(test)]
mod tests {
    use burn::tensor::bf16;

    use super::{
        amx, has_bf16_dot, product_bf16, product_bf16_rounded, product_bf16_via_f32,
        rounded_via_f32, Kernel, TEST_KERNEL,
    };

    /// Runs `f` with each kernel this CPU has (AMX, `vdpbf16ps`, the f32 fallback) chosen for
    /// this thread's products, naming it.
    fn each_kernel(f: impl Fn(&str)) {
        let kernels = [
            (Kernel::Amx, amx::available(), "amx"),
            (Kernel::Dot, has_bf16_dot(), "vdpbf16ps"),
            (Kernel::F32, true, "f32"),
        ];
        for (k, here, name) in kernels {
            if here {
                TEST_KERNEL.set(Some(k));
                f(name);
            } else {
                eprintln!("no {name} kernel on this CPU");
            }
        }
        TEST_KERNEL.set(None);
    }

    /// Deterministic values of magnitude ≤ 2 that are not bf16-exact.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 4.0 - 2.0 + 1e-3
            })
            .collect()
    }

    fn round(x: f32) -> f64 {
        f64::from(bf16::from_f64(f64::from(x)).to_f32())
    }

    /// The product of the rounded operands in f64.
    fn reference(
        l: &[f32],
        (lrs, lcs): (usize, usize),
        r: &[f32],
        (rrs, rcs): (usize, usize),
        (m, k, n): (usize, usize, usize),
    ) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|p| round(l[i * lrs + p * lcs]) * round(r[p * rrs + j * rcs]))
                    .sum();
            }
        }
        y
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], k: usize) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        // f32 accumulation of k products of magnitude ≤ 4.
        let tol = 4.0 * k as f64 * f64::from(f32::EPSILON) * 4.0;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= tol,
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    /// Shapes straddling the tile sizes (`vdpbf16ps`: 12×32 registers, 96×256 tasks, k blocks
    /// of 256; AMX: 16×16 tiles in 32×32 blocks, 128×128 tasks, 32 k per tile; odd k),
    /// row-major and transposed views, f32 and bf16 operands, on every kernel.
    #[test]
    fn bf16_products_match_the_rounded_reference() {
        each_kernel(products_match_the_rounded_reference);
    }

    fn products_match_the_rounded_reference(kernel: &str) {
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 7),
            (13, 33, 31),
            (97, 257, 33),
            (100, 600, 270),
            (24, 16, 64),
            (16, 32, 16),
            (33, 64, 130),
            (160, 70, 17),
            (192, 50, 160),
        ] {
            let l = values(m * k, 1);
            let r = values(k * n, 2);
            let want = reference(&l, (k, 1), &r, (n, 1), (m, k, n));
            let got = product_bf16(&l, (k, 1), &r, (n, 1), (m, k, n));
            assert_close(&format!("{kernel} {m}x{k}x{n}"), &got, &want, k);
            // The right side read transposed in place (x·Wᵀ with W: [n, k]).
            let rt: Vec<f32> = (0..n * k).map(|i| r[(i % k) * n + i / k]).collect();
            let got = product_bf16(&l, (k, 1), &rt, (1, k), (m, k, n));
            assert_close(&format!("{kernel} {m}x{k}x{n} rhsᵀ"), &got, &want, k);
            // The left side transposed (aᵀ·b) and given as bf16.
            let lt: Vec<bf16> = (0..k * m)
                .map(|i| bf16::from_f64(f64::from(l[(i % m) * k + i / m])))
                .collect();
            let got = product_bf16(&lt, (1, m), &r, (n, 1), (m, k, n));
            assert_close(&format!("{kernel} {m}x{k}x{n} lhsᵀ bf16"), &got, &want, k);
            // Both sides bf16 with `k`-contiguous rows (x·Wᵀ of bf16 tensors, odd k included).
            let lb: Vec<bf16> = l.iter().map(|&x| bf16::from_f64(f64::from(x))).collect();
            let rtb: Vec<bf16> = rt.iter().map(|&x| bf16::from_f64(f64::from(x))).collect();
            let got = product_bf16(&lb, (k, 1), &rtb, (1, k), (m, k, n));
            assert_close(&format!("{kernel} {m}x{k}x{n} bf16 rows"), &got, &want, k);
            let got = product_bf16_via_f32(&l, (k, 1), &r, (n, 1), (m, k, n));
            assert_close(&format!("{kernel} {m}x{k}x{n} via f32"), &got, &want, k);
            // Neither stride 1 (every other element of a twice-as-wide buffer).
            let spread: Vec<f32> = l.iter().flat_map(|&x| [x, -7.0]).collect();
            let got = product_bf16(&spread, (2 * k, 2), &r, (n, 1), (m, k, n));
            assert_close(&format!("{kernel} {m}x{k}x{n} strided"), &got, &want, k);
        }
    }

    /// `BELLOWS_BF16_KERNEL` picks a kernel the CPU has; anything else is reported and the
    /// fastest one used.
    #[test]
    fn the_kernel_variable_names_a_kernel_this_cpu_has() {
        use super::kernel_for;
        assert_eq!(kernel_for(None, true, true), (Kernel::Amx, None));
        assert_eq!(kernel_for(Some("dot"), true, true), (Kernel::Dot, None));
        assert_eq!(kernel_for(Some(" f32 "), true, true), (Kernel::F32, None));
        assert_eq!(kernel_for(None, false, true).0, Kernel::Dot);
        assert_eq!(kernel_for(None, false, false).0, Kernel::F32);
        let (k, note) = kernel_for(Some("amx"), false, true);
        assert_eq!(k, Kernel::Dot);
        assert!(note.is_some_and(|n| n.contains("no amx kernel")));
        let (k, note) = kernel_for(Some("AMX!"), true, true);
        assert_eq!(k, Kernel::Amx);
        assert!(note.is_some_and(|n| n.contains("AMX!") && n.contains("not one of")));
    }

    #[test]
    fn bf16_rounding_on_packing() {
        each_kernel(|_| rounding_on_packing());
        eprintln!("avx512_bf16: {}, AMX: {}", has_bf16_dot(), amx::available());
    }

    fn rounding_on_packing() {
        // 1 + 2⁻⁸ lies halfway between two bf16 values: nearest even rounds it down to 1.
        let x = [1.0 + 2f32.powi(-8)];
        let y = product_bf16(&x, (1, 1), &[1.0f32], (1, 1), (1, 1, 1));
        assert_eq!(y, vec![1.0]);
        let x = [1.0 + 3.0 * 2f32.powi(-8)];
        let y = product_bf16(&x, (1, 1), &[1.0f32], (1, 1), (1, 1, 1));
        assert_eq!(y, vec![1.0 + 2f32.powi(-6)]);
        // Just above a tie, Flex's cast (and so the packing) still rounds down: its f64 route
        // drops the three lowest mantissa bits (`bits::cast_bits`, tested there).
        let x = [f32::from_bits(0x3f80_8001)];
        let y = product_bf16(&x, (1, 1), &[1.0f32], (1, 1), (1, 1, 1));
        assert_eq!(y, vec![1.0]);
        // Whole rows: a row with a NaN goes element by element; normal rows vectorised.
        let x = [1.5f32, f32::NAN, 2.0 + 2f32.powi(-7)];
        let y = product_bf16(&x, (0, 1), &[1.0f32; 3], (1, 0), (1, 3, 1));
        assert!(y[0].is_nan());
        // Empty and k = 0 products.
        assert!(product_bf16::<f32, f32>(&[], (0, 1), &[], (1, 1), (0, 0, 3)).is_empty());
        assert_eq!(
            product_bf16::<f32, f32>(&[], (0, 1), &[], (1, 1), (2, 0, 2)),
            vec![0.0; 4]
        );
    }

    /// Results rounded as they leave the kernel, with and without a side path's addend, equal
    /// bit for bit to the composition's steps (`half`'s nearest-even conversion of the f32
    /// sums, then `r(r(y) + r(r(t)·s))`) — on the kernel and on the fallback.
    #[test]
    fn rounded_results_match_the_compositions_steps() {
        each_kernel(rounded_results_match);
    }

    fn rounded_results_match(kernel: &str) {
        let r = |v: f32| bf16::from_f32(v).to_f32();
        for &(m, k, n) in &[(1, 1, 1), (13, 33, 31), (97, 257, 300), (200, 40, 70)] {
            let (l, rt) = (values(m * k, 3), values(n * k, 4));
            let sums = product_bf16(&l, (k, 1), &rt, (1, k), (m, k, n));
            let t = values(m * n, 5);
            let s = r(0.37);
            let want_plain: Vec<bf16> = sums.iter().map(|&y| bf16::from_f32(y)).collect();
            let want_side: Vec<bf16> = sums
                .iter()
                .zip(&t)
                .map(|(&y, &t)| bf16::from_f32(r(y) + r(r(t) * s)))
                .collect();
            let dims = (m, k, n);
            let got = product_bf16_rounded(&l, (k, 1), &rt, (1, k), dims, None);
            assert_eq!(got, want_plain, "{kernel} {m}x{k}x{n}");
            let got = product_bf16_rounded(&l, (k, 1), &rt, (1, k), dims, Some((&t, s)));
            assert_eq!(got, want_side, "{kernel} {m}x{k}x{n} with a side path");
            // The fallback sums in another order: compare it with its own sums.
            let sums = product_bf16_via_f32(&l, (k, 1), &rt, (1, k), dims);
            let got = rounded_via_f32(&l, (k, 1), &rt, (1, k), dims, Some((&t, s)));
            for (i, (g, (&y, &t))) in got.iter().zip(sums.iter().zip(&t)).enumerate() {
                assert_eq!(
                    *g,
                    bf16::from_f32(r(y) + r(r(t) * s)),
                    "fallback, element {i}"
                );
            }
        }
    }

    /// A side product added inside the kernel's tasks gives the bits of the side product
    /// computed first and added as an addend, on every kernel, with the side's right operand
    /// read transposed (`B` of `x·Aᵀ·Bᵀ`) or as is (`A` of `dY·B·A`).
    #[test]
    fn side_products_equal_the_addend_they_replace() {
        each_kernel(|kernel| {
            use super::{product_bf16_of, product_bf16_rounded_of, product_bf16_side_of};
            use super::{Operand, Side};
            for &(m, k, n, r) in &[
                (1, 1, 1, 1),
                (37, 40, 70, 4),
                (160, 96, 200, 16),
                (64, 64, 32, 33),
            ] {
                let (l, rt) = (values(m * k, 11), values(n * k, 12));
                let xa: Vec<bf16> = values(m * r, 13)
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect();
                let b: Vec<bf16> = values(n * r, 14)
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect();
                let s = 0.375;
                for rhs_strides in [(1, r), (n, 1)] {
                    let (lhs, rhs) = (Operand::new(&l[..], (k, 1)), Operand::new(&rt[..], (1, k)));
                    let side = Side {
                        lhs: Operand::new(&xa[..], (r, 1)),
                        rhs: Operand::new(&b[..], rhs_strides),
                        k: r,
                        scale: s,
                    };
                    let t = product_bf16_of(side.lhs, side.rhs, (m, r, n));
                    let want = product_bf16_rounded_of(lhs, rhs, (m, k, n), Some((&t, s)));
                    let got = product_bf16_side_of(lhs, rhs, (m, k, n), side);
                    assert_eq!(got, want, "{kernel} {m}x{k}x{n} r {r} {rhs_strides:?}");
                }
            }
        });
    }

    /// A kept pack gives the product the fresh pack gives, for either side and a reused view.
    #[test]
    fn kept_packs_give_the_same_products() {
        each_kernel(|_| kept_packs_give_the_same());
    }

    fn kept_packs_give_the_same() {
        use super::{product_bf16_of, Operand, Owner};
        use std::sync::Arc;
        let (m, k, n) = (50, 70, 40);
        let (l, r) = (Arc::new(values(m * k, 6)), Arc::new(values(k * n, 7)));
        let (lo, ro): (Owner, Owner) = (l.clone(), r.clone());
        let fresh = product_bf16(&l, (k, 1), &r, (1, k), (m, k, n));
        for _ in 0..2 {
            let kept = product_bf16_of(
                Operand {
                    values: &l,
                    strides: (k, 1),
                    owner: Some(&lo),
                },
                Operand {
                    values: &r,
                    strides: (1, k),
                    owner: Some(&ro),
                },
                (m, k, n),
            );
            assert_eq!(kept, fresh);
        }
        // The same storage read as another view is packed afresh.
        let other = product_bf16_of(
            Operand {
                values: &l[..k * 10],
                strides: (k, 1),
                owner: Some(&lo),
            },
            Operand::new(&r[..], (1, k)),
            (10, k, n),
        );
        assert_eq!(other[..], fresh[..10 * n]);
    }
}
