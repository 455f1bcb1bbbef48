//! The fused ops' element-wise loops compiled for AVX-512 where the CPU has it: the workspace
//! builds for baseline x86-64 (SSE2), so without this a loop runs 4 lanes wide on a CPU with
//! 16. [`wide`] runs a closure inside a function compiled with the AVX-512 features, into which
//! the compiler inlines the closure's loops (a function may inline a callee whose features are
//! a subset of its own) and vectorises them with them.
//!
//! [`exp`] is an `exp` those loops can vectorise (libm's is a call per element), for the bf16
//! paths, whose rounding hides its last-ulp differences from libm.
//!
//! Unsafe code: calling the AVX-512 build after detecting the features.
#![allow(unsafe_code)]

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
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and `p` the degree-6 Taylor polynomial in Horner form
/// (relative error ≤ 3·10⁻⁷, a few ulp); exact at 0, `0` below −87.3, `∞` above 88.7, NaN
/// for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| ≤ 2⁸.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Rounds to the nearest integer by adding and taking away 1.5·2²³ (no `round` call).
    const SHIFT: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + SHIFT) - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ for n in [−126, 128] as 2^⌊n/2⌋ · 2^⌈n/2⌉, each an exponent field.
    let n = n as i32;
    let half = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = p * half(n >> 1) * half(n - (n >> 1));
    let y = if x > 88.7 { f32::INFINITY } else { y };
    let y = if x < -87.3 { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::{exp, wide};

    /// Within 4·10⁻⁷ relative of libm over the whole finite range, and the edges exact.
    #[test]
    fn exp_is_libms_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_77;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
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
