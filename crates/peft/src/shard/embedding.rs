//! Embedding lookup in a row-sharded table: the table is gathered for the lookup and dropped;
//! the backward pass scatters the output gradient into a full-size zero gradient and
//! reduce-scatters it back to the shards (no table is needed for that).

use std::any::Any;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, Int, Shape, Tensor, TensorPrimitive};

use super::Sharding;

#[derive(Debug)]
struct ShardedEmbeddingBackward;

impl<I: Backend> Backward<I, 1> for ShardedEmbeddingBackward {
    /// The indices `[b, s]`, the table's width and dtype, and how it is sharded.
    type State = (I::IntTensorPrimitive, usize, DType, Sharding);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        let Some(parent) = parent else {
            return;
        };
        let (indices, d, dtype, sharding) = ops.state;
        let indices = Tensor::<I, 2, Int>::from_primitive(indices);
        let [b, s] = indices.dims();
        let dy = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(grad)).reshape([b * s, d]);
        let full = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(I::float_select_add(
            I::float_zeros(
                Shape::new([sharding.rows, d]),
                &dy.device(),
                dy.dtype().into(),
            ),
            0,
            indices.reshape([b * s]).into_primitive(),
            dy.into_primitive().tensor(),
        )));
        let mine = sharding.reduce_scatter(full, dtype);
        grads.register::<I>(parent.id, mine.into_primitive().tensor());
    }
}

fn embedding_autodiff<I: Backend, C: CheckpointStrategy>(
    shard: Tensor<Autodiff<I, C>, 2>,
    ids: Tensor<Autodiff<I, C>, 2, Int>,
    sharding: &Sharding,
) -> Tensor<Autodiff<I, C>, 3> {
    let TensorPrimitive::Float(wp) = shard.into_primitive() else {
        panic!("a sharded table is a float tensor");
    };
    let ids_inner: Tensor<I, 2, Int> = Tensor::from_primitive(ids.into_primitive());
    let w = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(wp.primitive.clone()));
    let (d, dtype) = (w.dims()[1], w.dtype());
    let y = burn::tensor::module::embedding(sharding.gather(w, dtype), ids_inner.clone())
        .into_primitive()
        .tensor();
    let out = match ShardedEmbeddingBackward
        .prepare::<C>([wp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            sharding.remember(Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(
                wp.primitive.clone(),
            )));
            prep.finish((ids_inner.into_primitive(), d, dtype, sharding.clone()), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

type Pair<B> = (Tensor<B, 2>, Tensor<B, 2, Int>);

fn try_autodiff<B: Backend, I: Backend>(
    shard: Tensor<B, 2>,
    ids: Tensor<B, 2, Int>,
    sharding: &Sharding,
) -> Result<Tensor<B, 3>, Pair<B>> {
    let boxed: Box<dyn Any> = Box::new((shard, ids));
    match boxed.downcast::<Pair<Autodiff<I>>>() {
        Ok(pair) => {
            let (w, ids) = *pair;
            let y: Box<dyn Any> = Box::new(embedding_autodiff(w, ids, sharding));
            Ok(*y
                .downcast::<Tensor<B, 3>>()
                .expect("the output has the input's type"))
        }
        Err(pair) => Err(*pair
            .downcast::<Pair<B>>()
            .expect("a failed downcast returns the input")),
    }
}

/// The rows `ids: [b, s]` of a row-sharded table `[vocab, d]` of which this rank holds `shard`,
/// giving `[b, s, d]` in the table's dtype. Every rank must call it, in the same order. Backends
/// as for [`super::sharded_matmul_t`].
pub fn sharded_embedding<B: Backend>(
    shard: Tensor<B, 2>,
    ids: Tensor<B, 2, Int>,
    sharding: &Sharding,
) -> Tensor<B, 3> {
    let (shard, ids) = match try_autodiff::<B, burn::backend::Flex>(shard, ids, sharding) {
        Ok(y) => return y,
        Err(p) => p,
    };
    #[cfg(feature = "cuda")]
    let (shard, ids) = match try_autodiff::<B, burn::backend::Cuda>(shard, ids, sharding) {
        Ok(y) => return y,
        Err(p) => p,
    };
    if B::ad_enabled(&shard.device()) {
        sharding.fail(format!(
            "sharded weights train only on Autodiff<Flex> or Autodiff<Cuda>, not {}",
            B::name(&shard.device())
        ));
    }
    let dtype = shard.dtype();
    burn::tensor::module::embedding(sharding.gather(shard, dtype), ids)
}
