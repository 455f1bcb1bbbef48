//! burn helpers: host-staged collectives on tensors of any backend.
//!
//! The tensor is copied to host memory (`into_data`), reduced there, and copied back onto its device with
//! its original dtype. f64 tensors travel as f64; every other float dtype (f32, f16, bf16) travels as f32,
//! so f16/bf16 sums are rounded once at the end. This is simple and slow; device-side NCCL on burn-cuda
//! buffers is future work.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::comm::ReduceOp;
use crate::error::{Error, Result};
use crate::group::ProcessGroup;

fn tensor_err(op: &'static str, e: impl std::fmt::Debug) -> Error {
    Error::Tensor {
        op,
        message: format!("{e:?}"),
    }
}

/// Applies `f` to the tensor's values on the host (as f64 or f32) and rebuilds it on its device.
fn host_staged<B: Backend, const D: usize>(
    op: &'static str,
    t: Tensor<B, D>,
    f32_fn: impl FnOnce(&mut Vec<f32>) -> Result<()>,
    f64_fn: impl FnOnce(&mut Vec<f64>) -> Result<()>,
) -> Result<Tensor<B, D>> {
    let (device, shape, dtype) = (t.device(), t.shape(), t.dtype());
    if matches!(dtype, DType::QFloat(_)) {
        return Err(Error::Tensor {
            op,
            message: "quantized tensors are not supported: dequantize first".into(),
        });
    }
    let data = t.into_data();
    let out = if dtype == DType::F64 {
        let mut v = data.into_vec::<f64>().map_err(|e| tensor_err(op, e))?;
        f64_fn(&mut v)?;
        TensorData::new(v, shape)
    } else {
        let mut v = data
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| tensor_err(op, e))?;
        f32_fn(&mut v)?;
        TensorData::new(v, shape).convert_dtype(dtype)
    };
    Ok(Tensor::from_data(out, (&device, dtype)))
}

/// All-reduces a float tensor across the group (host-staged); returns the reduced tensor on the same
/// device with the same dtype. With a group of one, returns `t` untouched.
///
/// # Errors
/// Collective errors as for [`ProcessGroup::all_reduce`]; [`Error::Tensor`] for quantized tensors.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use bellows_dist::{all_reduce_tensor, ProcessGroup, ReduceOp};
/// let t = Tensor::<Flex, 1>::from_floats([1.0, 2.0], &Default::default());
/// let r = all_reduce_tensor(&ProcessGroup::single(), t, ReduceOp::Sum).unwrap();
/// assert_eq!(r.into_data().to_vec::<f32>().unwrap(), [1.0, 2.0]);
/// ```
pub fn all_reduce_tensor<B: Backend, const D: usize>(
    pg: &ProcessGroup,
    t: Tensor<B, D>,
    op: ReduceOp,
) -> Result<Tensor<B, D>> {
    if pg.world_size() == 1 {
        return Ok(t);
    }
    host_staged(
        "all_reduce_tensor",
        t,
        |v| pg.all_reduce(v, op),
        |v| pg.all_reduce(v, op),
    )
}

/// Replaces `t` on every rank with `root`'s tensor (host-staged; shapes must match on every rank).
///
/// # Errors
/// Collective errors as for [`ProcessGroup::broadcast`]; [`Error::Tensor`] for quantized tensors.
pub fn broadcast_tensor<B: Backend, const D: usize>(
    pg: &ProcessGroup,
    t: Tensor<B, D>,
    root: usize,
) -> Result<Tensor<B, D>> {
    if pg.world_size() == 1 {
        return Ok(t);
    }
    host_staged(
        "broadcast_tensor",
        t,
        |v| pg.broadcast(v, root),
        |v| pg.broadcast(v, root),
    )
}
