//! RMSNorm (Zhang & Sennrich 2019), computed in f32 as transformers' `LlamaRMSNorm` does:
//! `weight · (x / √(mean(x²) + ε))`. On `Autodiff<Flex>` a fused op with a hand-written backward
//! (`crate::fused::rms_norm`).

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

/// Root-mean-square layer norm with a learned per-channel `weight` (HF name).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel gain, `[d]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm of width `d` with unit gain.
    pub fn new(d: usize, eps: f64, device: &B::Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            eps,
        }
    }

    /// Normalises the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        crate::fused::rms_norm::rms_norm(x, self.weight.val(), self.eps)
    }
}
