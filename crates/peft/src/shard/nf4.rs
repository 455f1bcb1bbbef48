//! QLoRA under FSDP: an NF4 base sharded by rows at block boundaries. A row of `in` values is
//! `in / block_size` whole quantization blocks when `block_size` divides `in` (Llama widths
//! always do), so rank `r` keeps the packed codes and block scales of its rows; the tiny
//! double-quantization tables (nested scales, code book, offset) stay whole. The weight is
//! gathered (bytes) and dequantized for each use, and again in the backward pass, as for dense
//! sharded weights; it gets no gradient (it is frozen).

use std::any::Any;
use std::ops::Range;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData, TensorPrimitive};

use super::Sharding;
use crate::nf4::Nf4Weight;

/// Rows `rows` of `q` as a weight of their own (copied), or `None` when rows do not fall on
/// block boundaries (`block_size` does not divide `in`, or `in` is odd).
pub(crate) fn shard_nf4<B: Backend>(q: &Nf4Weight<B>, rows: Range<usize>) -> Option<Nf4Weight<B>> {
    if q.block_size == 0 || !q.d_in.is_multiple_of(q.block_size) || !q.d_in.is_multiple_of(2) {
        return None;
    }
    let (pb, bpr) = (q.d_in / 2, q.d_in / q.block_size);
    let bytes = |t: &Tensor<B, 1, Int>, per_row: usize| {
        let device = t.device();
        let data = t
            .clone()
            .narrow(0, rows.start * per_row, rows.len() * per_row)
            .into_data();
        Tensor::<B, 1, Int>::from_data(data, (&device, DType::U8))
    };
    let mut out = q.clone();
    out.packed = bytes(&q.packed, pb);
    out.absmax_codes = q.absmax_codes.as_ref().map(|c| bytes(c, bpr));
    out.absmax = q.absmax.as_ref().map(|a| {
        let device = a.device();
        let data = a
            .clone()
            .narrow(0, rows.start * bpr, rows.len() * bpr)
            .into_data();
        Tensor::from_data(data, (&device, DType::F32))
    });
    out.d_out = rows.len();
    Some(out)
}

fn host_bytes<B: Backend>(t: &Tensor<B, 1, Int>) -> Vec<u8> {
    t.clone()
        .into_data()
        .convert::<u8>()
        .into_vec::<u8>()
        .unwrap_or_default()
}

/// The whole NF4 weight from this rank's `shard` (every rank must call it).
pub(crate) fn gather_nf4<B: Backend>(shard: &Nf4Weight<B>, sharding: &Sharding) -> Nf4Weight<B> {
    let (pb, bpr) = (shard.d_in / 2, shard.d_in / shard.block_size);
    let device = shard.packed.device();
    let bytes = |t: &Tensor<B, 1, Int>, per_row: usize| {
        let all = sharding.gather_bytes(host_bytes(t), per_row);
        let n = all.len();
        Tensor::<B, 1, Int>::from_data(TensorData::new(all, [n]), (&device, DType::U8))
    };
    let mut full = shard.clone();
    full.packed = bytes(&shard.packed, pb);
    full.absmax_codes = shard.absmax_codes.as_ref().map(|c| bytes(c, bpr));
    full.absmax = shard.absmax.as_ref().map(|a| {
        let rows: Tensor<B, 2> = a.clone().reshape([shard.d_out, bpr]);
        let whole = sharding.gather(rows, DType::F32);
        whole.reshape([sharding.rows * bpr])
    });
    full.d_out = sharding.rows;
    full
}

#[derive(Debug)]
struct ShardedNf4Backward;

impl<I: Backend> Backward<I, 1> for ShardedNf4Backward {
    type State = (Nf4Weight<I>, Sharding);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        let (shard, sharding) = ops.state;
        // Every rank gathers, tracked or not, so the collectives stay in step.
        let w = gather_nf4(&shard, &sharding).dequantize();
        if let Some(parent) = parent {
            let dy = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grad));
            let dx = dy.clone().matmul(w.cast(dy.dtype()));
            grads.register::<I>(parent.id, dx.into_primitive().tensor());
        }
    }
}

fn matmul_autodiff<I: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<I, C>, 2>,
    shard: &Nf4Weight<Autodiff<I, C>>,
    sharding: &Sharding,
) -> Tensor<Autodiff<I, C>, 2> {
    let inner: Nf4Weight<I> = shard.valid();
    let TensorPrimitive::Float(xp) = x.into_primitive() else {
        panic!("an NF4 linear's input is a float tensor");
    };
    let x_inner = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(xp.primitive.clone()));
    let dtype = x_inner.dtype();
    let w = gather_nf4(&inner, sharding).dequantize().cast(dtype);
    let y = x_inner.matmul(w.transpose()).into_primitive().tensor();
    let out = match ShardedNf4Backward
        .prepare::<C>([xp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((inner, sharding.clone()), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn try_autodiff<B: Backend, I: Backend>(
    x: Tensor<B, 2>,
    shard: &Nf4Weight<B>,
    sharding: &Sharding,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let boxed: Box<dyn Any> = Box::new(x);
    match boxed.downcast::<Tensor<Autodiff<I>, 2>>() {
        Ok(x) => {
            let w = (shard as &dyn Any)
                .downcast_ref::<Nf4Weight<Autodiff<I>>>()
                .expect("the weight lives on the input's backend");
            let y: Box<dyn Any> = Box::new(matmul_autodiff(*x, w, sharding));
            Ok(*y
                .downcast::<Tensor<B, 2>>()
                .expect("the output has the input's type"))
        }
        Err(x) => Err(*x
            .downcast::<Tensor<B, 2>>()
            .expect("a failed downcast returns the input")),
    }
}

/// `x · Wᵀ` for a row-sharded NF4 `W` of which this rank holds `shard` (see the module docs),
/// in `x`'s dtype. Every rank must call it, in the same order. Backends as for
/// [`super::sharded_matmul_t`].
pub(crate) fn sharded_nf4_matmul_t<B: Backend>(
    x: Tensor<B, 2>,
    shard: &Nf4Weight<B>,
    sharding: &Sharding,
) -> Tensor<B, 2> {
    let x = match try_autodiff::<B, burn::backend::Flex>(x, shard, sharding) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "cuda")]
    let x = match try_autodiff::<B, burn::backend::Cuda>(x, shard, sharding) {
        Ok(y) => return y,
        Err(x) => x,
    };
    if B::ad_enabled(&x.device()) {
        sharding.fail(format!(
            "sharded weights train only on Autodiff<Flex> or Autodiff<Cuda>, not {}",
            B::name(&x.device())
        ));
    }
    let dtype = x.dtype();
    x.matmul(
        gather_nf4(shard, sharding)
            .dequantize()
            .cast(dtype)
            .transpose(),
    )
}
