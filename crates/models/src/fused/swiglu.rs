//! SwiGLU's gate (Shazeer 2020) as one autodiff node: `y = silu(g) · u = g · σ(g) · u`, with
//! `du = dy · g·σ(g)` and `dg = dy · u · σ(g) · (1 + g·(1 − σ(g)))`.
//!
//! One parallel pass forward and one backward over the `[tokens, intermediate]` activations,
//! vectorised ([`bellows_peft::fused::simd`]: AVX-512 where the CPU has it, `σ` on a
//! vectorised `exp` within 2 ulp of libm's), in the composition's order of operations, so the
//! output and the gradients equal `silu(g) · u`'s to rounding. `σ(g)` is recomputed in the
//! backward pass rather than kept.
//!
//! bf16 (mixed precision) is computed as PyTorch's CPU kernels compute it: `silu` in f32 on the
//! widened gate, rounded to bf16, then the product with `u` rounded (`y = r(r(silu(g))·u)`,
//! which is also the composition's `du = r(dy·r(silu(g)))`); `dg` is computed in f32 and
//! rounded once, where the composition rounds after each of its five backward ops.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::{activation, backend::Backend, bf16, DType, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use bellows_peft::fused::simd::{map2, map3_2, sigmoid};

use super::elem::{tensor, Elem};
use super::{on_backend, primitive, Ad};

/// `silu(g)·u`, one parallel pass (the composition's `g·σ(g)·u`), written straight into a new
/// buffer ([`map2`]: no zero-fill first).
fn forward<E: Elem>(g: &FlexTensor, u: &FlexTensor) -> Vec<E> {
    map2(
        E::slice(g),
        E::slice(u),
        #[inline(always)]
        |g: E, u: E| {
            let g = g.wide();
            E::narrow(E::narrow(g * sigmoid(g)).wide() * u.wide())
        },
    )
}

/// `(dg, du)` for upstream `dy`, both in one pass (g and u are both projections' outputs, so
/// both are nearly always wanted; an unwanted one is dropped by the caller).
fn backward<E: Elem>(g: &FlexTensor, u: &FlexTensor, dy: &FlexTensor) -> (Vec<E>, Vec<E>) {
    map3_2(
        (E::slice(g), E::slice(u), E::slice(dy)),
        #[inline(always)]
        |g: E, u: E, dy: E| {
            let [gi, ui, d] = [g, u, dy].map(E::wide);
            let s = sigmoid(gi);
            let du = E::narrow(d * E::narrow(gi * s).wide());
            // σ'(g) = σ(g)(1 − σ(g)), so d(g·σ(g))/dg = σ(g)·(1 + g·(1 − σ(g))).
            let slope = s * (gi * (-s + 1.0) + 1.0);
            (E::narrow(d * ui * slope), du)
        },
    )
}

#[derive(Debug)]
struct State {
    g: FlexTensor,
    u: FlexTensor,
    shape: Shape,
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pg, pu] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let shape = st.shape.clone();
        let (dg, du) = if st.g.dtype() == DType::BF16 {
            let (dg, du) = backward::<bf16>(&st.g, &st.u, &dy);
            (tensor(dg, shape.clone()), tensor(du, shape))
        } else {
            let (dg, du) = backward::<f32>(&st.g, &st.u, &dy);
            (tensor(dg, shape.clone()), tensor(du, shape))
        };
        if let Some(pg) = pg {
            grads.register::<Flex>(pg.id, dg);
        }
        if let Some(pu) = pu {
            grads.register::<Flex>(pu.id, du);
        }
    }
}

fn swiglu_autodiff<const D: usize>(g: Tensor<Ad, D>, u: Tensor<Ad, D>) -> Tensor<Ad, D> {
    let shape = g.shape();
    let (gp, up) = (primitive(g), primitive(u));
    let (gi, ui) = (gp.primitive.to_contiguous(), up.primitive.to_contiguous());
    let y = if gi.dtype() == DType::BF16 {
        tensor(forward::<bf16>(&gi, &ui), shape.clone())
    } else {
        tensor(forward::<f32>(&gi, &ui), shape.clone())
    };
    let out = match SwigluBackward
        .prepare::<NoCheckpointing>([gp.node, up.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Arc::new(State {
                g: gi,
                u: ui,
                shape,
            }),
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `silu(g) · u`, element-wise, in the inputs' dtype (`g` and `u` have the same shape).
///
/// On `Autodiff<Flex>` with f32 or bf16 inputs one fused node; elsewhere burn's
/// `silu(g) * u`.
pub(crate) fn swiglu<B: Backend, const D: usize>(g: Tensor<B, D>, u: Tensor<B, D>) -> Tensor<B, D> {
    if !matches!(g.dtype(), DType::F32 | DType::BF16) || u.dtype() != g.dtype() {
        return activation::silu(g) * u;
    }
    match on_backend((g, u), |(g, u): (Tensor<Ad, D>, Tensor<Ad, D>)| {
        swiglu_autodiff(g, u)
    }) {
        Ok(y) => y,
        Err((g, u)) => activation::silu(g) * u,
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{activation, DType};

    use super::super::testing::{assert_close, leaf, loss, twin};
    use super::swiglu;

    fn check(dtype: DType, (ya_tol, atol, rtol): (f32, f32, f32)) {
        let (g, u) = (leaf([2, 6, 24], dtype, 2), leaf([2, 6, 24], dtype, 3));
        let (ga, ua, gb, ub) = (twin(&g), twin(&u), twin(&g), twin(&u));
        let ya = swiglu(ga.clone(), ua.clone());
        assert_eq!(ya.dtype(), dtype);
        let yb = activation::silu(gb.clone()) * ub.clone();
        assert_close("y", ya.clone(), yb.clone(), 0.0, ya_tol);
        let (gra, grb) = (loss(ya).backward(), loss(yb).backward());
        let dga = ga.grad(&gra).expect("dg");
        assert_close("dg", dga, gb.grad(&grb).expect("dg"), atol, rtol);
        let dua = ua.grad(&gra).expect("du");
        assert_close("du", dua, ub.grad(&grb).expect("du"), atol, rtol);
    }

    #[test]
    fn fused_swiglu_matches_silu_times_up_in_f32() {
        // σ on the vectorised `exp` (within 2 ulp of libm's, which Flex's `sigmoid` calls).
        check(DType::F32, (1e-6, 1e-6, 1e-5));
    }

    /// bf16: within the composition's own rounding steps (one or two bf16 steps, 2⁻⁸ each).
    #[test]
    fn fused_swiglu_in_bf16_matches_the_composition_to_bf16_rounding() {
        check(DType::BF16, (1.6e-2, 1e-2, 1.6e-2));
    }
}
