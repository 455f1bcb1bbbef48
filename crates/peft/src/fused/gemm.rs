//! Strided f32 matrix products on the `gemm` crate (the kernels burn-flex itself calls), for the
//! fused ops here and in `bellows_models`: operands are read in place with any row and column
//! strides, so transposed weights and per-head column blocks need no copy.
//!
//! Unsafe code: `gemm` takes raw pointers; [`product`] checks its slices' extents first.
#![allow(unsafe_code)]

/// Products of at least this many multiply-adds use every core (Flex's own threshold); smaller
/// ones run on the calling thread.
const PARALLEL: usize = 192 * 192 * 192;

/// `dst[m×n] ← dst·[accumulate] + beta · lhs[m×k] · rhs[k×n]`, every operand addressed by
/// (row, column) element strides; `dst` is row-major with row stride `dst_rs`.
///
/// # Safety
/// `dst`, `lhs` and `rhs` must address `m×n`, `m×k` and `k×n` strided elements inside live
/// buffers, and `dst` must not overlap the others.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let par = if m * n * k >= PARALLEL {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // Asked as the transposed product `dstᵀ[n×m] = rhsᵀ · lhsᵀ`, whose destination is
    // column-major — the orientation `gemm` computes in — rather than leaving the swap to it:
    // the same sums in the same order (the bench's losses are equal to the bit), the step's
    // products 4.5 % less time in all, most for `x·Wᵀ`, which reads `W` transposed
    // (docs/BENCHMARKS.md).
    // SAFETY: forwarded from the caller; the views are the same elements, transposed.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            dst,
            dst_rs as isize,
            1,
            accumulate,
            rhs,
            rhs_rs as isize,
            rhs_cs as isize,
            lhs,
            lhs_rs as isize,
            lhs_cs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// Panics unless `lhs` (`len` elements) holds its `[rows, k]` view and `rhs` its `[k, cols]`.
pub(super) fn check_views(
    (lhs, lhs_strides): (usize, (usize, usize)),
    (rhs, rhs_strides): (usize, (usize, usize)),
    (rows, k, cols): (usize, usize, usize),
) {
    assert!(
        extent(rows, k, lhs_strides) <= lhs,
        "lhs view out of its slice"
    );
    assert!(
        extent(k, cols, rhs_strides) <= rhs,
        "rhs view out of its slice"
    );
}

/// The last element a `[rows, cols]` view with strides `(rs, cs)` touches, plus one.
fn extent(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `lhs · rhs` into a new row-major `[rows, cols]` buffer, `lhs` viewed as `[rows, k]` and `rhs`
/// as `[k, cols]` with the given (row, column) strides.
///
/// # Panics
/// If a view reaches past its slice.
pub fn product(
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    (rows, k, cols): (usize, usize, usize),
) -> Vec<f32> {
    let dims = (rows, k, cols);
    check_views((lhs.len(), lhs_strides), (rhs.len(), rhs_strides), dims);
    if k == 0 {
        return vec![0.0; rows * cols];
    }
    let t0 = super::product_stats::start();
    // Not zero-filled: the product overwrites every element (`accumulate` off).
    let mut y: Vec<f32> = Vec::with_capacity(rows * cols);
    // SAFETY: both views were checked against their slices; `y`'s spare capacity holds
    // rows×cols elements, all of which `gemm` writes before `set_len` declares them.
    unsafe {
        matmul_strided(
            (rows, cols, k),
            y.spare_capacity_mut().as_mut_ptr().cast::<f32>(),
            cols,
            false,
            lhs.as_ptr(),
            lhs_strides,
            rhs.as_ptr(),
            rhs_strides,
            1.0,
        );
        y.set_len(rows * cols);
    }
    super::product_stats::record(t0, dims, (lhs_strides, rhs_strides));
    y
}
