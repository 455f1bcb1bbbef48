//! RMSNorm (Zhang & Sennrich 2019), computed in f32 as transformers' `LlamaRMSNorm` does:
//! `weight · (x / √(mean(x²) + ε))`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor};

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
        let dtype = x.dtype();
        let xf = if dtype == DType::F32 {
            x
        } else {
            x.cast(DType::F32)
        };
        let var = xf.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = xf * (var + self.eps).sqrt().recip();
        let normed = if dtype == DType::F32 {
            normed
        } else {
            normed.cast(dtype)
        };
        let w = self.weight.val();
        let w = if w.dtype() == dtype { w } else { w.cast(dtype) };
        normed * w.unsqueeze()
    }
}
