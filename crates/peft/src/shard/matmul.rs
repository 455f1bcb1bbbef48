//! `x · Wᵀ` with a row-sharded `W`: gathered for the product and dropped, gathered again in the
//! backward pass (`dx = dy · W`), its gradient `dyᵀ · x` reduce-scattered back to the shards.
//!
//! A plain `x.matmul(gather(w).transpose())` would be correct, but burn's matmul keeps its right
//! operand for the backward pass, so every layer's full weight would stay alive from forward to
//! backward. The custom op keeps `x` and the shard only, as PyTorch FSDP's
//! `reshard_after_forward` does.
//!
//! In bf16 on the CPU the products run on the bf16 kernel ([`crate::fused::matmul`]), as
//! the unsharded layer's fused op does, so a sharded layer computes the same bits.

use std::any::Any;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

use super::Sharding;
use crate::fused::matmul;

#[derive(Debug)]
struct ShardedMatmulBackward;

impl<I: Backend> Backward<I, 2> for ShardedMatmulBackward {
    /// `x`, the weight's shard, and how it is sharded.
    type State = (I::FloatTensorPrimitive, I::FloatTensorPrimitive, Sharding);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        let (x, shard, sharding) = ops.state;
        let dy = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grad));
        let shard = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(shard));
        let shard_dtype = shard.dtype();
        let w = sharding.gather_for_backward(shard, dy.dtype());
        if let Some(px) = px {
            let dx = matmul(dy.clone(), false, w, false);
            grads.register::<I>(px.id, dx.into_primitive().tensor());
        }
        if let Some(pw) = pw {
            let x = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(x));
            let dt = dy.dtype();
            let dw = matmul(dy, true, x.cast(dt), false);
            let mine = sharding.reduce_scatter(dw, shard_dtype);
            grads.register::<I>(pw.id, mine.into_primitive().tensor());
        }
    }
}

fn matmul_autodiff<I: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<I, C>, 2>,
    shard: Tensor<Autodiff<I, C>, 2>,
    sharding: &Sharding,
) -> Tensor<Autodiff<I, C>, 2> {
    let (TensorPrimitive::Float(xp), TensorPrimitive::Float(wp)) =
        (x.into_primitive(), shard.into_primitive())
    else {
        panic!("sharded weights and their inputs are float tensors");
    };
    let x_inner = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(xp.primitive.clone()));
    let w_inner = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(wp.primitive.clone()));
    let dtype = x_inner.dtype();
    let w = sharding.gather(w_inner, dtype);
    let y = matmul(x_inner, false, w, true).into_primitive().tensor();
    let out = match ShardedMatmulBackward
        .prepare::<C>([xp.node.clone(), wp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            sharding.remember(w_shard_for_trail::<I>(&wp.primitive));
            prep.finish((xp.primitive, wp.primitive, sharding.clone()), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The shard as a tensor, for [`Sharding::remember`] (a handle to the same data).
fn w_shard_for_trail<I: Backend>(w: &I::FloatTensorPrimitive) -> Tensor<I, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(w.clone()))
}

type Pair<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// Runs [`matmul_autodiff`] when `B` is `Autodiff<I>`; gives the inputs back otherwise.
fn try_autodiff<B: Backend, I: Backend>(
    x: Tensor<B, 2>,
    shard: Tensor<B, 2>,
    sharding: &Sharding,
) -> Result<Tensor<B, 2>, Pair<B>> {
    let boxed: Box<dyn Any> = Box::new((x, shard));
    match boxed.downcast::<Pair<Autodiff<I>>>() {
        Ok(pair) => {
            let (x, w) = *pair;
            let y: Box<dyn Any> = Box::new(matmul_autodiff(x, w, sharding));
            Ok(*y
                .downcast::<Tensor<B, 2>>()
                .expect("the output has the input's type"))
        }
        Err(pair) => Err(*pair
            .downcast::<Pair<B>>()
            .expect("a failed downcast returns the input")),
    }
}

/// `x · Wᵀ` for `x: [n, in]` and a row-sharded `W: [out, in]` of which this rank holds `shard`,
/// giving `[n, out]` in `x`'s dtype. Every rank must call it, in the same order.
///
/// On `Autodiff<Flex>` (and `Autodiff<Cuda>` with the `cuda` feature) this is a custom op and the
/// full weight is not kept for the backward pass (see the module docs). Other backends gather and
/// multiply (inference); another autodiff backend could not send a gradient back through the
/// gather, so it records an error in the sharding instead of training silently wrong.
pub fn sharded_matmul_t<B: Backend>(
    x: Tensor<B, 2>,
    shard: Tensor<B, 2>,
    sharding: &Sharding,
) -> Tensor<B, 2> {
    let (x, shard) = match try_autodiff::<B, burn::backend::Flex>(x, shard, sharding) {
        Ok(y) => return y,
        Err(p) => p,
    };
    #[cfg(feature = "cuda")]
    let (x, shard) = match try_autodiff::<B, burn::backend::Cuda>(x, shard, sharding) {
        Ok(y) => return y,
        Err(p) => p,
    };
    if B::ad_enabled(&x.device()) {
        sharding.fail(format!(
            "sharded weights train only on Autodiff<Flex> or Autodiff<Cuda>, not {}",
            B::name(&x.device())
        ));
    }
    let dtype = x.dtype();
    matmul(x, false, sharding.gather(shard, dtype), true)
}
