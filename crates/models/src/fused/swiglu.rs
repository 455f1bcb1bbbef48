//! SwiGLU's gate (Shazeer 2020) as one autodiff node: `y = silu(g) · u = g · σ(g) · u`, with
//! `du = dy · g·σ(g)` and `dg = dy · u · σ(g) · (1 + g·(1 − σ(g)))`.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{activation, backend::Backend, Tensor, TensorPrimitive};

use super::{inner, on_backend, prim, Ad};

#[derive(Debug)]
struct SwigluBackward<const D: usize>;

impl<I: Backend, const D: usize> Backward<I, 2> for SwigluBackward<D> {
    /// `g`, `u` and `σ(g)`.
    type State = (
        I::FloatTensorPrimitive,
        I::FloatTensorPrimitive,
        I::FloatTensorPrimitive,
    );

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pg, pu] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        let (g, u, s) = ops.state;
        let (g, u, s) = (inner::<I, D>(g), inner::<I, D>(u), inner::<I, D>(s));
        let dy = inner::<I, D>(grad);
        if let Some(pu) = pu {
            let du = dy.clone() * (g.clone() * s.clone());
            grads.register::<I>(pu.id, prim(du));
        }
        if let Some(pg) = pg {
            // σ'(g) = σ(g)(1 − σ(g)), so d(g·σ(g))/dg = σ(g)·(1 + g·(1 − σ(g))).
            let slope = s.clone() * (g * (s.neg().add_scalar(1.0))).add_scalar(1.0);
            let dg = dy * u * slope;
            grads.register::<I>(pg.id, prim(dg));
        }
    }
}

fn swiglu_autodiff<I: Backend, C: CheckpointStrategy, const D: usize>(
    g: Tensor<Autodiff<I, C>, D>,
    u: Tensor<Autodiff<I, C>, D>,
) -> Tensor<Autodiff<I, C>, D> {
    let (TensorPrimitive::Float(gp), TensorPrimitive::Float(up)) =
        (g.into_primitive(), u.into_primitive())
    else {
        panic!("swiglu takes float tensors");
    };
    let gi = inner::<I, D>(gp.primitive.clone());
    let s = activation::sigmoid(gi.clone());
    let y = prim(gi * s.clone() * inner::<I, D>(up.primitive.clone()));
    let out = match SwigluBackward::<D>
        .prepare::<C>([gp.node, up.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((gp.primitive, up.primitive, prim(s)), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `silu(g) · u`, element-wise, in the inputs' dtype (`g` and `u` have the same shape).
///
/// On `Autodiff<Flex>` with f32 inputs one fused node; elsewhere burn's `silu(g) * u`. Low
/// precision keeps the composition: the fused bf16 gradients round differently and broke the
/// bit-exact resume of `precision::pure_bf16_trains_and_resumes_exactly`.
pub(crate) fn swiglu<B: Backend, const D: usize>(g: Tensor<B, D>, u: Tensor<B, D>) -> Tensor<B, D> {
    if g.dtype() != burn::tensor::DType::F32 {
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

    fn check(dtype: DType, atol: f32, rtol: f32) {
        let (g, u) = (leaf([2, 6, 24], dtype, 2), leaf([2, 6, 24], dtype, 3));
        let (ga, ua, gb, ub) = (twin(&g), twin(&u), twin(&g), twin(&u));
        let ya = swiglu(ga.clone(), ua.clone());
        let yb = activation::silu(gb.clone()) * ub.clone();
        assert_close("y", ya.clone(), yb.clone(), 0.0, 0.0);
        let (gra, grb) = (loss(ya).backward(), loss(yb).backward());
        let dga = ga.grad(&gra).expect("dg");
        assert_close("dg", dga, gb.grad(&grb).expect("dg"), atol, rtol);
        let dua = ua.grad(&gra).expect("du");
        assert_close("du", dua, ub.grad(&grb).expect("du"), atol, rtol);
    }

    #[test]
    fn fused_swiglu_matches_silu_times_up_in_f32() {
        check(DType::F32, 1e-6, 1e-5);
    }

    #[test]
    fn swiglu_in_bf16_is_the_plain_composition() {
        check(DType::BF16, 2e-2, 2e-2);
    }
}
