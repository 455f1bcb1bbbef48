//! Mixed-precision helper: use a tensor in another float dtype.

use burn::tensor::{backend::Backend, DType, Tensor};

/// `t` in dtype `dt`: a differentiable cast when they differ (mixed precision: f32 master weights
/// used in a bf16/f16 forward), the tensor itself otherwise. f32 ↔ bf16 on the CPU backend is
/// one parallel pass ([`crate::fused::cast`]), the same values as burn's `cast`.
pub fn in_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dt: DType) -> Tensor<B, D> {
    if t.dtype() == dt {
        t
    } else {
        crate::fused::cast(t, dt).unwrap_or_else(|t| t.cast(dt))
    }
}
