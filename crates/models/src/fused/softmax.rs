//! Softmax over the last dimension as one autodiff node: the forward is the backend's own
//! softmax, the backward `dx = y · (dy − Σⱼ dyⱼ·yⱼ)` from the saved output `y`.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{activation, backend::Backend, Tensor, TensorPrimitive};

use super::{inner, on_backend, prim, Ad};

#[derive(Debug)]
struct SoftmaxBackward<const D: usize>;

impl<I: Backend, const D: usize> Backward<I, 1> for SoftmaxBackward<D> {
    /// The output `y`.
    type State = I::FloatTensorPrimitive;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        if let Some(parent) = parent {
            let y = inner::<I, D>(ops.state);
            let dy = inner::<I, D>(grad);
            let dot = (dy.clone() * y.clone()).sum_dim(D - 1);
            let dx = y * (dy - dot);
            grads.register::<I>(parent.id, prim(dx));
        }
    }
}

fn softmax_autodiff<I: Backend, C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<I, C>, D>,
) -> Tensor<Autodiff<I, C>, D> {
    let TensorPrimitive::Float(xp) = x.into_primitive() else {
        panic!("softmax takes a float tensor");
    };
    let y = prim(activation::softmax(inner::<I, D>(xp.primitive), D - 1));
    let out = match SoftmaxBackward::<D>
        .prepare::<C>([xp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `softmax(x)` over the last dimension, in `x`'s dtype.
///
/// On `Autodiff<Flex>` one fused node; elsewhere burn's `softmax`.
pub(crate) fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match on_backend(x, |x: Tensor<Ad, D>| softmax_autodiff(x)) {
        Ok(y) => y,
        Err(x) => activation::softmax(x, D - 1),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{activation, Bool, DType, Tensor, TensorData};

    use super::super::testing::{assert_close, leaf, loss, twin};
    use super::softmax_last;

    #[test]
    fn fused_softmax_matches_burn_softmax_and_its_gradient() {
        let x = leaf([2, 3, 5, 7], DType::F32, 1);
        // A causal-style mask: -inf entries must get probability 0 and gradient 0.
        let m: Vec<bool> = (0..5 * 7).map(|k| k % 7 > k / 7 + 2).collect();
        let mask =
            Tensor::<super::Ad, 4, Bool>::from_data(TensorData::new(m, [1, 1, 5, 7]), &x.device())
                .expand([2, 3, 5, 7]);
        let (xa, xb) = (twin(&x), twin(&x));
        let ya = softmax_last(xa.clone().mask_fill(mask.clone(), f32::NEG_INFINITY));
        let yb = activation::softmax(xb.clone().mask_fill(mask, f32::NEG_INFINITY), 3);
        assert_close("y", ya.clone(), yb.clone(), 1e-6, 1e-5);
        let (ga, gb) = (loss(ya).backward(), loss(yb).backward());
        let (dxa, dxb) = (xa.grad(&ga).expect("dx"), xb.grad(&gb).expect("dx"));
        assert_close("dx", dxa, dxb, 1e-6, 1e-4);
    }
}
