//! Strided f32 matrix products on the `gemm` crate (the kernels burn-flex itself calls), for the
//! fused ops here and in `bellows_models`: operands are read in place with any row and column
//! strides, so transposed weights and per-head column blocks need no copy.
//!
//! Unsafe code: `gemm` takes raw pointers; [`product`] checks its slices' extents first.
#![allow(unsafe_code)]

use rayon::prelude::*;

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
    let call = Call {
        dims: (m, n, k),
        dst,
        dst_rs,
        accumulate,
        lhs: (lhs.cast_mut(), lhs_rs, lhs_cs),
        rhs: (rhs.cast_mut(), rhs_rs, rhs_cs),
        beta,
    };
    let threads = rayon::current_num_threads();
    if m * n * k >= PARALLEL && rhs_cs != 1 && n <= PREPACKED_COLS && n >= MR * threads {
        // `gemm` would pack all of `rhsᵀ` (row-major for it) on the calling thread before its
        // parallel part — `W` of `x·Wᵀ`, while the other threads wait. Instead each thread
        // takes its own block of columns, whose part of `rhs` it packs itself: the same
        // per-element sums (the depth blocking does not depend on `n`), tested to the bit.
        let cols = n.div_ceil(threads).div_ceil(MR) * MR;
        (0..n.div_ceil(cols)).into_par_iter().for_each(|t| {
            let (c0, c1) = (t * cols, ((t + 1) * cols).min(n));
            // SAFETY: columns `c0..c1` of the caller's views; the tasks' `dst` columns are
            // disjoint.
            unsafe { call.columns(c0, c1).run(gemm::Parallelism::None) };
        });
        return;
    }
    let par = if m * n * k >= PARALLEL {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller.
    unsafe { call.run(par) };
}

/// Up to this many columns, `gemm` packs a row-major `rhsᵀ` whole before its parallel part
/// (its `m ≤ 2·mc`, `mc` at most 8 × 64 rows).
const PREPACKED_COLS: usize = 1024;

/// The column blocks' granularity: `gemm`'s widest register tile on AVX-512 (4 vectors of 16),
/// so that every block but the last is whole tiles, computed by the kernel the single call
/// would use (its narrower tail kernels round differently).
const MR: usize = 64;

/// The arguments of one [`matmul_strided`] call, operands as (pointer, row stride, column
/// stride).
#[derive(Clone, Copy)]
struct Call {
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*mut f32, usize, usize),
    rhs: (*mut f32, usize, usize),
    beta: f32,
}
// SAFETY: the column tasks read the operands and write disjoint columns of `dst`.
unsafe impl Send for Call {}
unsafe impl Sync for Call {}

impl Call {
    /// The same product restricted to columns `c0..c1`.
    fn columns(self, c0: usize, c1: usize) -> Self {
        let (m, _, k) = self.dims;
        let (rhs, rs, cs) = self.rhs;
        Call {
            dims: (m, c1 - c0, k),
            dst: self.dst.wrapping_add(c0),
            rhs: (rhs.wrapping_add(c0 * cs), rs, cs),
            ..self
        }
    }

    /// One `gemm` call with parallelism `par`.
    ///
    /// # Safety
    /// As [`matmul_strided`].
    unsafe fn run(self, par: gemm::Parallelism) {
        let (m, n, k) = self.dims;
        let ((lhs, lhs_rs, lhs_cs), (rhs, rhs_rs, rhs_cs)) = (self.lhs, self.rhs);
        // Asked as the transposed product `dstᵀ[n×m] = rhsᵀ · lhsᵀ`, whose destination is
        // column-major — the orientation `gemm` computes in — rather than leaving the swap to
        // it: the same sums in the same order (the bench's losses are equal to the bit), the
        // step's products 4.5 % less time in all, most for `x·Wᵀ`, which reads `W` transposed
        // (docs/BENCHMARKS.md).
        // SAFETY: forwarded from the caller; the views are the same elements, transposed.
        unsafe {
            gemm::gemm(
                n,
                m,
                k,
                self.dst,
                self.dst_rs as isize,
                1,
                self.accumulate,
                rhs,
                rhs_rs as isize,
                rhs_cs as isize,
                lhs,
                lhs_rs as isize,
                lhs_cs as isize,
                1.0,
                self.beta,
                false,
                false,
                false,
                par,
            );
        }
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

#[cfg(test)]
mod tests {
    use super::{matmul_strided, Call};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32)
            .map(|v| v / (1u32 << 24) as f32 - 0.5)
            .collect()
    }

    /// `x·Wᵀ` shapes that take the column-block path give what one `gemm` call over all columns
    /// gives, to the bit (overwriting and accumulating), and the f64 product to rounding.
    #[test]
    fn column_blocks_equal_one_parallel_call() {
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a test pool");
            for (m, n, k) in [
                (200, 512, 300),
                (64, 256, 1376),
                (1024, 1000, 64),
                (96, 200, 700),
            ] {
                let (x, w) = (values(m * k, 1), values(n * k, 7));
                let (xs, ws) = ((k, 1), (1, k)); // x row-major, W [n, k] read as Wᵀ
                for accumulate in [false, true] {
                    let init = values(m * n, 3);
                    let (mut split, mut whole) = (init.clone(), init.clone());
                    pool.install(|| unsafe {
                        matmul_strided(
                            (m, n, k),
                            split.as_mut_ptr(),
                            n,
                            accumulate,
                            x.as_ptr(),
                            xs,
                            w.as_ptr(),
                            ws,
                            0.75,
                        );
                        Call {
                            dims: (m, n, k),
                            dst: whole.as_mut_ptr(),
                            dst_rs: n,
                            accumulate,
                            lhs: (x.as_ptr().cast_mut(), xs.0, xs.1),
                            rhs: (w.as_ptr().cast_mut(), ws.0, ws.1),
                            beta: 0.75,
                        }
                        .run(gemm::Parallelism::Rayon(0));
                    });
                    let what = format!("{m}x{n}x{k}, accumulate {accumulate}, {threads} threads");
                    assert!(
                        split
                            .iter()
                            .zip(&whole)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: column blocks differ from one call"
                    );
                    for (i, j) in [(0, 0), (m - 1, n - 1), (m / 2, n / 3), (7, n - 17)] {
                        let dot: f64 = (0..k)
                            .map(|l| f64::from(x[i * k + l]) * f64::from(w[j * k + l]))
                            .sum();
                        let want = 0.75 * dot
                            + if accumulate {
                                f64::from(init[i * n + j])
                            } else {
                                0.0
                            };
                        let got = f64::from(split[i * n + j]);
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{what}: ({i}, {j}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
