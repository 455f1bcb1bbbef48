//! The fused ops' element-wise loops compiled for AVX-512 where the CPU has it: the workspace
//! builds for baseline x86-64 (SSE2), so without this a loop runs 4 lanes wide on a CPU with
//! 16. [`wide`] runs a closure inside a function compiled with the AVX-512 features, into which
//! the compiler inlines the closure's loops (a function may inline a callee whose features are
//! a subset of its own) and vectorises them with them.
//!
//! [`exp`] is an `exp` those loops can vectorise (libm's is a call per element), within 2 ulp
//! (PyTorch's CPU kernels likewise use a vectorised `exp`, Sleef's).
//!
//! Unsafe code: calling the AVX-512 build after detecting the features; [`map`]'s
//! collection into the vector's spare capacity.
#![allow(unsafe_code)]

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Whether this CPU has AVX-512 F, BW and VL and FMA (detected once, then a load).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f()`, compiled for AVX-512 where the CPU has it (the same arithmetic either way: the
/// features widen the vectors, they do not change what is computed). `f` must be marked
/// `#[inline(always)]` (`wide(#[inline(always)] || …)`), or the compiler may keep it a
/// baseline function of its own and call it.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the features `v4` is compiled for.
        return unsafe { v4(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
fn v4<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `eˣ` in f32 without branches or calls (so that loops over it vectorise): `2ⁿ · p(r)` with
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and Cephes' `expf` polynomial (`1 + r + r²·P(r)`,
/// within ~1 ulp of the exact value); exact at 0, `0` below −87.3, `∞` above 88.7, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact (Cephes' C1, C2).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Rounds to the nearest integer by adding and taking away 1.5·2²³ (no `round` call).
    const SHIFT: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let shifted = xc * LOG2E + SHIFT;
    let n = shifted - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let p = p * (r * r) + r + 1.0;
    // 2ⁿ for n in [−126, 128] as 2^⌊n/2⌋ · 2^⌈n/2⌉, each an exponent field. `n` as an integer
    // from `shifted`'s bits, not `n as i32`: `shifted` lies in [2²³, 2²⁴), where consecutive
    // integers are consecutive bit patterns, so the difference of the patterns is `n` exactly
    // — and integer arithmetic vectorises, where `as i32` (saturating, NaN to 0) became a
    // scalar conversion and two compares per lane (a 4.6-cycle `exp`). Wrapping: for a NaN
    // `x` the bits are meaningless and the result is replaced below.
    let n = shifted.to_bits().wrapping_sub(SHIFT.to_bits()) as i32;
    let half = |k: i32| f32::from_bits((k.wrapping_add(127) as u32) << 23);
    let y = p * half(n >> 1) * half(n - (n >> 1));
    let y = if x > 88.7 { f32::INFINITY } else { y };
    let y = if x < -87.3 { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `σ(x) = 1 / (1 + e⁻ˣ)` on [`exp`], without branches.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Elements per parallel task of [`map`].
const CHUNK: usize = 1 << 14;

/// A new vector of `len` elements written in parallel chunks of `chunk` (the last may be
/// shorter) by `f(index of the chunk's first element, chunk)`, each task run in [`wide`]'s
/// AVX-512 build (`f` should be `#[inline(always)]`). Nothing is zero-filled first.
///
/// # Safety
/// `f` must write every element of each chunk it is given.
///
/// # Panics
/// If `chunk` is 0.
pub unsafe fn par_written<D: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [MaybeUninit<D>]) + Sync,
) -> Vec<D> {
    // SAFETY: forwarded (a `()` per chunk is no allocation).
    unsafe { par_written_with(len, chunk, f).0 }
}

/// [`par_written`] where each chunk's task also returns a value: those values in chunk order.
///
/// # Safety
/// `f` must write every element of each chunk it is given.
///
/// # Panics
/// If `chunk` is 0.
pub unsafe fn par_written_with<D: Send, R: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [MaybeUninit<D>]) -> R + Sync,
) -> (Vec<D>, Vec<R>) {
    assert!(chunk > 0, "chunks of 0 elements");
    let mut out: Vec<D> = Vec::with_capacity(len);
    let each: Vec<R> = out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| {
            wide(
                #[inline(always)]
                || f(i * chunk, c),
            )
        })
        .collect();
    // SAFETY: the chunks cover all `len` elements, each written by `f` (the caller's contract).
    unsafe { out.set_len(len) };
    (out, each)
}

/// `f` of every element of `src` into a new vector, in parallel chunks, each run in [`wide`]'s
/// AVX-512 build (`f` should be `#[inline(always)]`, so that it is compiled into it).
pub fn map<S: Copy + Sync, D: Send>(src: &[S], f: impl Fn(S) -> D + Sync) -> Vec<D> {
    // SAFETY: each chunk's elements are written, one per element of `src` at its offset.
    unsafe {
        par_written(
            src.len(),
            CHUNK,
            #[inline(always)]
            |at, o| {
                for (o, &x) in o.iter_mut().zip(&src[at..]) {
                    o.write(f(x));
                }
            },
        )
    }
}

/// `f` of each pair `(a[i], b[i])` into a new vector, as [`map`] does for one input.
///
/// # Panics
/// If `a` and `b` differ in length.
pub fn map2<A: Copy + Sync, B: Copy + Sync, D: Send>(
    a: &[A],
    b: &[B],
    f: impl Fn(A, B) -> D + Sync,
) -> Vec<D> {
    assert_eq!(a.len(), b.len(), "map2 over slices of different lengths");
    // SAFETY: each chunk's elements are written, one per pair of `a` and `b` at its offset.
    unsafe {
        par_written(
            a.len(),
            CHUNK,
            #[inline(always)]
            |at, o| {
                for ((o, &a), &b) in o.iter_mut().zip(&a[at..]).zip(&b[at..]) {
                    o.write(f(a, b));
                }
            },
        )
    }
}

/// The two results of `f` on each triple `(a[i], b[i], c[i])` into two new vectors, as [`map`]
/// does for one input and one result.
///
/// # Panics
/// If the slices differ in length.
pub fn map3_2<A, B, C, D, E>(
    (a, b, c): (&[A], &[B], &[C]),
    f: impl Fn(A, B, C) -> (D, E) + Sync,
) -> (Vec<D>, Vec<E>)
where
    A: Copy + Sync,
    B: Copy + Sync,
    C: Copy + Sync,
    D: Send,
    E: Send,
{
    let n = a.len();
    assert!(
        b.len() == n && c.len() == n,
        "map3_2 over slices of different lengths"
    );
    let (mut d, mut e): (Vec<D>, Vec<E>) = (Vec::with_capacity(n), Vec::with_capacity(n));
    d.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(e.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .zip(c.par_chunks(CHUNK))
        .for_each(|((((d, e), a), b), c)| {
            wide(
                #[inline(always)]
                || {
                    for k in 0..d.len().min(e.len()).min(a.len()).min(b.len()).min(c.len()) {
                        let (x, y) = f(a[k], b[k], c[k]);
                        d[k].write(x);
                        e[k].write(y);
                    }
                },
            )
        });
    // SAFETY: the equal-length chunks cover all `n` elements of both, each written above.
    unsafe {
        d.set_len(n);
        e.set_len(n);
    }
    (d, e)
}

/// A new vector of `len` elements made in parallel chunks of `chunk` (the last may be shorter):
/// each task sets its chunk to `fill`, then `f(chunk index, chunk)` writes what it wants. Where
/// most of a buffer is overwritten, this replaces `vec![fill; len]` — filled by one thread while
/// the others wait — with a fill each task does on its own chunk while it is in cache.
///
/// # Panics
/// If `chunk` is 0.
pub fn par_filled<T: Copy + Send + Sync>(
    len: usize,
    chunk: usize,
    fill: T,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let task = |at: usize, c: &mut [MaybeUninit<T>]| {
        for x in c.iter_mut() {
            x.write(fill);
        }
        // SAFETY: every element of `c` was written just above.
        let c = unsafe { &mut *(c as *mut [MaybeUninit<T>] as *mut [T]) };
        f(at / chunk, c);
    };
    // SAFETY: `task` fills every element of its chunk first.
    unsafe { par_written(len, chunk, task) }
}

/// The element-wise sum of `parts` (each `len` long; `len` zeros when there are none), added
/// pairwise — neighbours, then neighbours' sums, … — so the rounding error grows with the log
/// of the number of parts, where adding them in turn grows it linearly; the order depends only
/// on the number of parts.
pub fn pairwise_sum(mut parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    while parts.len() > 1 {
        // The pairs of a level in parallel (each `a += b` is element-wise: the same sums in
        // any order of the pairs or vector width).
        parts.par_chunks_mut(2).for_each(|pair| {
            if let [a, b] = pair {
                wide(
                    #[inline(always)]
                    || {
                        for (a, &b) in a.iter_mut().zip(b.iter()) {
                            *a += b;
                        }
                    },
                );
            }
        });
        parts = parts.into_iter().step_by(2).collect();
    }
    parts.pop().unwrap_or_else(|| vec![0.0; len])
}

/// Lanes of the reductions below: one AVX-512 vector of f32.
pub const LANES: usize = 16;

/// The largest value of `v` (−∞ when empty), taken in [`LANES`] interleaved partial maxima so
/// that the loop vectorises (the same value as a sequential max, NaN aside).
#[inline(always)]
pub fn max(v: &[f32]) -> f32 {
    let chunks = v.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut m = [f32::NEG_INFINITY; LANES];
    for c in chunks {
        for (m, &x) in m.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    m.into_iter().fold(tail, f32::max)
}

/// The sum of `v` in [`LANES`] interleaved partial sums (so that the loop vectorises), element
/// `j` always in lane `j % LANES` and the lanes added in a fixed order: appending zeros (a
/// longer masked row) leaves the sum unchanged, bit for bit, as a sequential sum's is. The
/// order differs from a sequential sum's by rounding.
#[inline(always)]
pub fn sum(v: &[f32]) -> f32 {
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut s = [0.0f32; LANES];
    for c in chunks {
        for (s, &x) in s.iter_mut().zip(c) {
            *s += x;
        }
    }
    for (s, &x) in s.iter_mut().zip(tail) {
        *s += x;
    }
    s.iter().sum()
}

/// `Σ a[j]·b[j]` over the shorter slice, in [`sum`]'s lanes and order (each product rounded,
/// then summed as [`sum`] sums: `dot(a, b) == sum(a·b)` bit for bit).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    let mut s = [0.0f32; LANES];
    for (ca, cb) in ca.zip(cb) {
        for ((s, &x), &y) in s.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    for ((s, &x), &y) in s.iter_mut().zip(ta).zip(tb) {
        *s += x * y;
    }
    s.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::{dot, exp, map, map2, map3_2, max, pairwise_sum, par_filled, sum, wide};

    #[test]
    fn map_applies_f_to_every_element_in_order() {
        let v: Vec<u32> = (0..100_000).collect();
        let got = map(&v, |x| x as f32 * 0.5);
        assert_eq!(got, v.iter().map(|&x| x as f32 * 0.5).collect::<Vec<_>>());
        assert!(map(&[] as &[u32], |x| x).is_empty());
    }

    #[test]
    fn lane_reductions_match_sequential_ones() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.25)
                .collect();
            let m = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max(&v), m, "max of {n}");
            // Quarter-integers summed exactly in any order.
            assert_eq!(sum(&v), v.iter().sum::<f32>(), "sum of {n}");
            // Inexact values: trailing zeros (a longer masked row) change nothing.
            let w: Vec<f32> = (0..n).map(|i| 1.0 / (i as f32 + 3.0)).collect();
            let mut padded = w.clone();
            padded.extend([0.0; 21]);
            assert_eq!(
                sum(&w).to_bits(),
                sum(&padded).to_bits(),
                "padded sum of {n}"
            );
        }
    }

    #[test]
    fn map2_and_map3_2_apply_f_to_every_element_in_order() {
        let a: Vec<u32> = (0..70_000).collect();
        let b: Vec<f32> = (0..70_000).map(|i| i as f32 * 0.25).collect();
        let got = map2(&a, &b, |x, y| x as f32 + y);
        assert_eq!(
            got,
            a.iter()
                .zip(&b)
                .map(|(&x, &y)| x as f32 + y)
                .collect::<Vec<_>>()
        );
        let (d, e) = map3_2((&a, &b, &b), |x, y, z| (x as f32 - y, y * z));
        assert_eq!(
            d,
            a.iter()
                .zip(&b)
                .map(|(&x, &y)| x as f32 - y)
                .collect::<Vec<_>>()
        );
        assert_eq!(e, b.iter().map(|&y| y * y).collect::<Vec<_>>());
        assert!(map2(&[] as &[u32], &[] as &[u32], |x, _| x).is_empty());
    }

    /// Every chunk starts as `fill` (what a task leaves alone stays `fill`), chunk indices in
    /// order, the last chunk shorter.
    #[test]
    fn par_filled_fills_then_hands_each_chunk_over() {
        let got = par_filled(10_007, 100, -1.0f32, |i, c| {
            if i % 3 != 0 {
                for (j, x) in c.iter_mut().enumerate().skip(1) {
                    *x = (i * 100 + j) as f32;
                }
            }
        });
        let want: Vec<f32> = (0..10_007)
            .map(|e| {
                let (i, j) = (e / 100, e % 100);
                if i % 3 == 0 || j == 0 {
                    -1.0
                } else {
                    e as f32
                }
            })
            .collect();
        assert_eq!(got, want);
        assert!(par_filled(0, 4, 0u8, |_, _| unreachable!()).is_empty());
    }

    /// Neighbours first: ((p0 + p1) + (p2 + p3)) + p4, element-wise; none gives zeros.
    #[test]
    fn pairwise_sum_adds_neighbours_first() {
        let parts: Vec<Vec<f32>> = [1e8f32, 1.0, -1e8, 1.0, 0.5]
            .iter()
            .map(|&v| vec![v, 2.0 * v])
            .collect();
        let want: Vec<f32> = (0..2)
            .map(|e| {
                let p = |i: usize| parts[i][e];
                ((p(0) + p(1)) + (p(2) + p(3))) + p(4)
            })
            .collect();
        assert_eq!(pairwise_sum(parts, 2), want);
        assert_eq!(pairwise_sum(Vec::new(), 3), vec![0.0; 3]);
    }

    /// `dot` rounds each product and sums the products as `sum` does.
    #[test]
    fn dot_is_the_lane_sum_of_the_products() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let a: Vec<f32> = (0..n).map(|i| 1.0 / (i as f32 + 3.0)).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let products: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
            assert_eq!(
                dot(&a, &b).to_bits(),
                sum(&products).to_bits(),
                "dot of {n}"
            );
            let wide_dot = wide(
                #[inline(always)]
                || dot(&a, &b),
            );
            assert_eq!(
                wide_dot.to_bits(),
                sum(&products).to_bits(),
                "wide dot of {n}"
            );
        }
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0]), 14.0);
    }

    /// Within 2·10⁻⁷ relative (under 2 ulp) of the exact value over the whole finite range,
    /// and the edges exact.
    #[test]
    fn exp_is_libms_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_77;
        }
        assert!(worst < 2e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// `exp` as it was with `n as i32`, to the bit, on every 61st f32 in [−90, 90] (36 million
    /// values, every exponent `n` many times over; all 2.2 billion also agreed, once, in 40 s),
    /// so the vectorising exponent (from `shifted`'s bits) changed no value.
    #[test]
    fn exp_equals_the_float_to_int_version_to_the_bit() {
        fn with_cast(x: f32) -> f32 {
            let xc = x.clamp(-87.3, 88.7);
            let n = (xc * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = (xc - n * 0.693_359_4) - n * -2.121_944_4e-4;
            let p = 1.987_569_1e-4;
            let p = p * r + 1.398_199_9e-3;
            let p = p * r + 8.333_452e-3;
            let p = p * r + 4.166_579_6e-2;
            let p = p * r + 1.666_666_5e-1;
            let p = p * r + 0.5;
            let p = p * (r * r) + r + 1.0;
            let n = n as i32;
            let half = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
            let y = p * half(n >> 1) * half(n - (n >> 1));
            let y = if x > 88.7 { f32::INFINITY } else { y };
            if x < -87.3 {
                0.0
            } else {
                y
            }
        }
        const STRIDE: u32 = 61;
        let mut checked = 0u64;
        // Negative floats from −90 up to −0 are bit patterns counting down, positives from 0
        // to 90 patterns counting up.
        let (neg, pos) = ((-90.0f32).to_bits(), 90.0f32.to_bits());
        let negatives = ((-0.0f32).to_bits()..=neg).rev().step_by(STRIDE as usize);
        for bits in negatives.chain((0..=pos).step_by(STRIDE as usize)) {
            let x = f32::from_bits(bits);
            assert_eq!(exp(x).to_bits(), with_cast(x).to_bits(), "exp({x})");
            checked += 1;
        }
        assert!(checked > 35_000_000, "{checked} values");
    }

    /// The wide build computes what the baseline build computes.
    #[test]
    fn wide_computes_the_same_values() {
        let v: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 0.0173).collect();
        let base: Vec<f32> = v.iter().map(|&x| exp(x) * 0.5 + x).collect();
        let fast: Vec<f32> = wide(
            #[inline(always)]
            || v.iter().map(|&x| exp(x) * 0.5 + x).collect(),
        );
        assert_eq!(base, fast);
    }
}
