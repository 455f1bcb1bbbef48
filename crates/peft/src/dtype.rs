//! Mixed-precision helper: use a tensor in another float dtype.

use burn::tensor::{backend::Backend, DType, Tensor};

/// `t` in dtype `dt`: a differentiable cast when they differ (mixed precision: f32 master weights
/// used in a bf16/f16 forward), the tensor itself otherwise.
pub fn in_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dt: DType) -> Tensor<B, D> {
    if t.dtype() == dt {
        t
    } else {
        t.cast(dt)
    }
}
