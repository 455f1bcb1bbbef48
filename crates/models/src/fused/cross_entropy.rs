//! The causal-LM cross-entropy sum as one op on `Autodiff<Flex>` and `Flex`: per counted
//! position `w·(logsumexp(x) − x[label])`, summed. One parallel pass over the logits forward
//! (max and sum of exponentials per row) and one backward (`dx = g·w·(softmax(x) − onehot)`)
//! replace the composition's slice copy, log-softmax, gather, weighting and their backward nodes
//! — about fifteen single-threaded passes over a `[batch, seq, vocab]` tensor.
//!
//! bf16 logits (mixed precision) are widened row by row — the composition's f32 cast, without
//! its f32 copy of the logits — and the gradient is rounded back to bf16 as that cast's
//! backward rounds it ([`bellows_peft::fused::bits::cast_bits`]), so the two paths agree as in f32.

use std::any::TypeId;
use std::sync::Arc;

use bellows_peft::fused::bits::cast_row;
use bellows_peft::fused::simd::{self, wide};
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, bf16, DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::elem::{tensor, Elem};
use super::{f32_slice as slice, flex_tensor, on_backend, primitive, Ad};

/// Targets of one call: position `t < s − 1` of sequence `bi` predicts `targets[bi·(s−1) + t]`
/// with weight `weights[..]` (0 = ignored).
#[derive(Debug)]
struct Targets {
    b: usize,
    s: usize,
    v: usize,
    targets: Vec<usize>,
    weights: Vec<f32>,
}

impl Targets {
    /// The logits row of prediction `p` (sequence `p / (s−1)`, position `p % (s−1)`).
    fn row(&self, p: usize) -> usize {
        (p / (self.s - 1)) * self.s + p % (self.s - 1)
    }
}

/// `logsumexp` of every counted row (f32, max-shifted, vectorised) and the weighted sum of
/// `lse − x[label]` (accumulated in f64).
fn forward<E: Elem>(x: &[E], t: &Targets) -> (Vec<f32>, f64) {
    let v = t.v;
    let lse: Vec<f32> = (0..t.targets.len())
        .into_par_iter()
        .map(|p| {
            let row = &x[t.row(p) * v..(t.row(p) + 1) * v];
            wide(
                #[inline(always)]
                || lse_row(row),
            )
        })
        .collect();
    let sum = (0..t.targets.len())
        .map(|p| {
            let w = t.weights[p];
            if w == 0.0 {
                0.0
            } else {
                f64::from(w) * f64::from(lse[p] - x[t.row(p) * v + t.targets[p]].wide())
            }
        })
        .sum();
    (lse, sum)
}

/// `logsumexp(row)`, max-shifted, on [`simd`]'s vectorised `exp` and lane-wise max and sum
/// (inlined into [`wide`]'s AVX-512 build).
#[inline(always)]
fn lse_row<E: Elem>(row: &[E]) -> f32 {
    let mut e: Vec<f32> = row.iter().map(|a| a.wide()).collect();
    let m = simd::max(&e);
    for x in e.iter_mut() {
        *x = simd::exp(*x - m);
    }
    m + simd::sum(&e).ln()
}

/// `d logits` for the upstream gradient `g` of the sum: `g·w·(softmax(x) − onehot(label))` on
/// counted rows, 0 elsewhere (the last position of each sequence, ignored labels).
///
/// Each row is computed in f32 and goes out through `finish` (a copy in f32; Flex's cast for
/// bf16 logits).
fn backward<E: Elem, O: Copy + Send + Sync + Default>(
    x: &[E],
    t: &Targets,
    lse: &[f32],
    g: f32,
    finish: impl Fn(&[f32], &mut [O]) + Sync,
) -> Vec<O> {
    let (s, v) = (t.s, t.v);
    // Zero-filled row by row in the tasks (32 MiB on the small model, one thread's memset).
    simd::par_filled(t.b * s * v, v, O::default(), |r, out| {
        let (bi, pos) = (r / s, r % s);
        if pos == s - 1 {
            return;
        }
        let p = bi * (s - 1) + pos;
        let gw = g * t.weights[p];
        if gw == 0.0 {
            return;
        }
        let row = &x[r * v..(r + 1) * v];
        let label = t.targets[p];
        let mut d = vec![0.0f32; v];
        wide(
            #[inline(always)]
            || softmax_row(row, lse[p], gw, &mut d),
        );
        d[label] -= gw;
        finish(&d, out);
    })
}

/// `gw·exp(x − lse)` of a row into `d` (inlined into [`wide`]'s AVX-512 build).
#[inline(always)]
fn softmax_row<E: Elem>(row: &[E], lse: f32, gw: f32, d: &mut [f32]) {
    for (d, &a) in d.iter_mut().zip(row) {
        *d = gw * simd::exp(a.wide() - lse);
    }
}

/// `cast_row` of `d` into `out` (inlined into [`wide`]'s AVX-512 build).
#[inline(always)]
fn cast_bits_row(d: &[f32], bits: &mut [u16], out: &mut [bf16]) {
    cast_row(d, bits);
    for (o, &b) in out.iter_mut().zip(&*bits) {
        *o = bf16::from_bits(b);
    }
}

/// A row of f32 gradients into bf16 as Flex's `cast` rounds ([`cast_row`], vectorised).
fn cast_into(d: &[f32], out: &mut [bf16]) {
    let mut bits = vec![0u16; d.len()];
    wide(
        #[inline(always)]
        || cast_bits_row(d, &mut bits, out),
    );
}

/// `f(x, dtype)` on the f32 or bf16 elements of a contiguous Flex tensor.
fn read<R>(x: &FlexTensor, f32s: impl FnOnce(&[f32]) -> R, bf16s: impl FnOnce(&[bf16]) -> R) -> R {
    match x.dtype() {
        DType::BF16 => bf16s(Elem::slice(x)),
        _ => f32s(Elem::slice(x)),
    }
}

#[derive(Debug)]
struct State {
    logits: FlexTensor,
    targets: Targets,
    lse: Vec<f32>,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(parent) = parent {
            let st = ops.state;
            let g = slice(&grad)[0];
            let t = &st.targets;
            let shape = [t.b, t.s, t.v];
            let dx = read(
                &st.logits,
                |x| {
                    tensor(
                        backward(x, t, &st.lse, g, |d, o| o.copy_from_slice(d)),
                        shape,
                    )
                },
                // The composition's `cast(F32)` backward: Flex's cast to bf16.
                |x| tensor(backward(x, t, &st.lse, g, cast_into), shape),
            );
            grads.register::<Flex>(parent.id, dx);
        }
    }
}

fn scalar(sum: f64) -> FlexTensor {
    flex_tensor(vec![sum as f32], [1])
}

/// `Σ w·(logsumexp(logits[bi, t]) − logits[bi, t, target])` over `t < s − 1`, as a `[1]` f32
/// tensor, for f32 or bf16 `logits: [b, s, v]` on `Autodiff<Flex>` or `Flex`; `targets` and `weights`
/// are `[b, s − 1]` (targets inside the vocabulary). Other backends and dtypes get `logits`
/// back as `Err`.
pub(crate) fn cross_entropy_sum<B: Backend>(
    logits: Tensor<B, 3>,
    targets: &[i64],
    weights: &[f32],
) -> Result<Tensor<B, 1>, Tensor<B, 3>> {
    let ty = TypeId::of::<B>();
    let [b, s, v] = logits.dims();
    if !matches!(logits.dtype(), DType::F32 | DType::BF16)
        || s < 2
        || (ty != TypeId::of::<Ad>() && ty != TypeId::of::<Flex>())
    {
        return Err(logits);
    }
    let t = Targets {
        b,
        s,
        v,
        targets: targets.iter().map(|&l| l.max(0) as usize).collect(),
        weights: weights.to_vec(),
    };
    if ty == TypeId::of::<Ad>() {
        on_backend(logits, move |x: Tensor<Ad, 3>| tracked(x, t))
    } else {
        on_backend(logits, |x: Tensor<Flex, 3>| {
            let x = primitive(x).to_contiguous();
            let (_, sum) = read(&x, |x| forward(x, &t), |x| forward(x, &t));
            Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(scalar(sum)))
        })
    }
}

fn tracked(x: Tensor<Ad, 3>, t: Targets) -> Tensor<Ad, 1> {
    let xp = primitive(x);
    let logits = xp.primitive.to_contiguous();
    let (lse, sum) = read(&logits, |x| forward(x, &t), |x| forward(x, &t));
    let y = scalar(sum);
    let out = match CrossEntropyBackward
        .prepare::<NoCheckpointing>([xp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Arc::new(State {
                logits,
                targets: t,
                lse,
            }),
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{DType, Tensor};

    use super::super::testing::{assert_close, leaf, twin};
    use super::cross_entropy_sum;
    use crate::loss::composed_sum;

    /// `[2, 7]` positions over a vocabulary of 11, every third label ignored (weight 0).
    fn targets() -> (Vec<i64>, Vec<f32>) {
        let n = 2 * 6;
        let t = (0..n).map(|p| (p * 5 % 11) as i64).collect();
        let w = (0..n).map(|p| if p % 3 == 2 { 0.0 } else { 1.0 }).collect();
        (t, w)
    }

    /// Fused vs composition, the sum and its gradient, for f32 and bf16 logits (the
    /// composition casts bf16 to f32; its cast's backward rounds the gradient back to bf16).
    fn check(dtype: DType, dx_tol: (f32, f32)) {
        let x = leaf([2, 7, 11], DType::F32, 4)
            .mul_scalar(3.0)
            .cast(dtype)
            .detach()
            .require_grad();
        let (xa, xb) = (twin(&x), twin(&x));
        let (t, w) = targets();
        let fused = cross_entropy_sum(xa.clone(), &t, &w)
            .unwrap_or_else(|_| panic!("the fused path is taken on Autodiff<Flex>"));
        let plain = composed_sum(xb.clone(), t, w);
        assert_close("sum", fused.clone(), plain.clone(), 1e-5, 1e-6);
        // A non-unit upstream gradient.
        let (ga, gb) = (
            fused.mul_scalar(0.37).backward(),
            plain.mul_scalar(0.37).backward(),
        );
        let (da, db) = (xa.grad(&ga).expect("dx"), xb.grad(&gb).expect("dx"));
        assert_eq!(da.dtype(), dtype, "the gradient in the logits' dtype");
        assert_close("dx", da, db, dx_tol.0, dx_tol.1);
    }

    #[test]
    fn fused_cross_entropy_matches_the_composition_and_its_gradient() {
        check(DType::F32, (1e-6, 1e-5));
        // bf16: the same f32 values before the gradient's rounding, so equal up to one bf16
        // step where f32 rounding differences straddle a rounding boundary.
        check(DType::BF16, (1e-6, 8e-3));
    }

    #[test]
    fn fused_cross_entropy_without_autodiff_matches_the_composition() {
        let data = leaf([2, 7, 11], DType::F32, 4).into_data();
        let x = Tensor::<Flex, 3>::from_data(data, &Default::default());
        let (t, w) = targets();
        let fused = cross_entropy_sum(x.clone(), &t, &w)
            .unwrap_or_else(|_| panic!("the fused path is taken for f32 on Flex"));
        assert_close("sum", fused, composed_sum(x, t, w), 1e-5, 1e-6);
        let half = leaf([2, 7, 11], DType::F32, 4).cast(DType::F16);
        let (t, w) = targets();
        assert!(
            cross_entropy_sum(half, &t, &w).is_err(),
            "f16 logits keep the composition"
        );
    }
}
