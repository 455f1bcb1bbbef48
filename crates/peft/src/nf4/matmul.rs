//! `x · Wᵀ` with an NF4 weight, and its backward pass, dequantizing on the fly.
//!
//! A plain `x.matmul(w.dequantize().transpose())` is correct, but on an autodiff backend the
//! matmul keeps its right operand for the backward pass: every layer's dequantized `f32` weight
//! would stay alive from forward to backward, so training would hold the full-precision model
//! after all. The custom op below keeps only the quantized weight and dequantizes again in the
//! backward pass (`dx = dy · W`), as bitsandbytes' `MatMul4Bit` does. No gradient reaches the
//! weight: it is frozen. Under bf16 compute on the CPU both products run on the bf16 kernel
//! ([`crate::fused::matmul`]).

use std::any::Any;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

use super::weight::Nf4Weight;
use crate::dtype::in_dtype;
use crate::fused::matmul;

#[derive(Debug)]
struct Nf4MatmulBackward;

impl<I: Backend> Backward<I, 1> for Nf4MatmulBackward {
    type State = Nf4Weight<I>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        if let Some(parent) = parent {
            let dy = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grad));
            let w = in_dtype(ops.state.dequantize(), dy.dtype());
            let dx = matmul(dy, false, w, false);
            grads.register::<I>(parent.id, dx.into_primitive().tensor());
        }
    }
}

/// The custom autodiff op on `Autodiff<I, C>`: forward on the inner backend, backward
/// re-dequantizes from the quantized state.
fn matmul_autodiff<I: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<I, C>, 2>,
    w: &Nf4Weight<Autodiff<I, C>>,
) -> Tensor<Autodiff<I, C>, 2> {
    let inner: Nf4Weight<I> = w.valid();
    let xp = match x.into_primitive() {
        TensorPrimitive::Float(t) => t,
        TensorPrimitive::QFloat(_) => panic!("NF4 linear input must be a float tensor"),
    };
    let x_inner = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(xp.primitive.clone()));
    let dtype = x_inner.dtype();
    let w = in_dtype(inner.dequantize(), dtype);
    let y = matmul(x_inner, false, w, true).into_primitive().tensor();
    let out = match Nf4MatmulBackward
        .prepare::<C>([xp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(inner, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Runs [`matmul_autodiff`] when `B` is `Autodiff<I>`; gives `x` back otherwise.
fn try_autodiff<B: Backend, I: Backend>(
    x: Tensor<B, 2>,
    w: &Nf4Weight<B>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let boxed: Box<dyn Any> = Box::new(x);
    match boxed.downcast::<Tensor<Autodiff<I>, 2>>() {
        Ok(x) => {
            let w = (w as &dyn Any)
                .downcast_ref::<Nf4Weight<Autodiff<I>>>()
                .expect("the weight lives on the input's backend");
            let y: Box<dyn Any> = Box::new(matmul_autodiff(*x, w));
            Ok(*y
                .downcast::<Tensor<B, 2>>()
                .expect("the output has the input's type"))
        }
        Err(x) => Err(*x
            .downcast::<Tensor<B, 2>>()
            .expect("a failed downcast returns the input")),
    }
}

/// `x · Wᵀ` for `x: [n, in]` and an NF4 `W: [out, in]`, giving `[n, out]` in `x`'s dtype.
///
/// On `Autodiff<Flex>` (and `Autodiff<Cuda>` with the `cuda` feature) this is a custom op whose
/// backward pass re-dequantizes, so no dense weight outlives the forward pass. Rust has no
/// specialisation, so the backend is recognised by type at run time; any other backend takes
/// the plain path (dequantize, then matmul), which is numerically identical but, under autodiff,
/// keeps the dequantized weight until backward.
pub(crate) fn nf4_matmul_t<B: Backend>(x: Tensor<B, 2>, w: &Nf4Weight<B>) -> Tensor<B, 2> {
    let x = match try_autodiff::<B, burn::backend::Flex>(x, w) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "cuda")]
    let x = match try_autodiff::<B, burn::backend::Cuda>(x, w) {
        Ok(y) => return y,
        Err(x) => x,
    };
    let dtype = x.dtype();
    matmul(x, false, in_dtype(w.dequantize(), dtype), true)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Distribution, Tensor, Tolerance};

    use super::super::{quantize_nf4, Nf4Options, Nf4Weight};
    use crate::in_dtype;

    type Ad = Autodiff<Flex>;

    /// Under bf16 compute the op (bf16 kernel, fast casts) gives the composition's output and
    /// input gradient, to bf16 rounding.
    #[test]
    fn nf4_matmul_in_bf16_matches_the_composition() {
        let dev = Default::default();
        let values: Vec<f32> = (0..24 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0)
            .collect();
        let w = Nf4Weight::<Ad>::from_data(
            &quantize_nf4(&values, &[24, 64], Nf4Options::default()),
            &dev,
        );
        let x = Tensor::<Ad, 2>::random([9, 64], Distribution::Normal(0.0, 1.0), &dev)
            .cast(DType::BF16);
        let (xa, xb) = (x.clone().detach().require_grad(), x.detach().require_grad());
        let ya = w.matmul_t(xa.clone());
        let yb = xb
            .clone()
            .matmul(in_dtype(w.dequantize(), DType::BF16).transpose());
        assert_eq!(ya.dtype(), DType::BF16);
        let close = |a: Tensor<Flex, 2>, b: Tensor<Flex, 2>| {
            a.cast(DType::F32).into_data().assert_approx_eq::<f32>(
                &b.cast(DType::F32).into_data(),
                Tolerance::rel_abs(8e-3, 1e-2),
            );
        };
        close(ya.clone().inner(), yb.clone().inner());
        let c = Tensor::<Ad, 2>::random([9, 24], Distribution::Normal(0.0, 1.0), &dev);
        let (ga, gb) = (
            (ya.cast(DType::F32) * c.clone()).sum().backward(),
            (yb.cast(DType::F32) * c).sum().backward(),
        );
        close(xa.grad(&ga).expect("dx"), xb.grad(&gb).expect("dx"));
    }
}
