//! An adapter-ready linear layer: a (possibly frozen) base weight plus an optional LoRA side path.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::init::InitRng;

use crate::config::{LoraInit, LoraSpec};

/// A LoRA adapter: `ΔW = scale · B · A` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").
///
/// Stored in PEFT's layout: `lora_a` is `[r, in]` and `lora_b` is `[out, r]`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// The down projection A, `[r, in]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// The up projection B, `[out, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// Dropout on the adapter's input.
    pub dropout: Dropout,
    /// The scale applied to the side path: alpha / r (or alpha / √r for rsLoRA).
    pub scale: f64,
    /// The alpha the scale was derived from (kept for export).
    pub alpha: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// Creates a new adapter for a `[out, in]` weight, initialised as `spec.init` says.
    pub fn new(
        spec: &LoraSpec,
        d_in: usize,
        d_out: usize,
        rng: &mut InitRng,
        device: &B::Device,
    ) -> Self {
        let a = match spec.init {
            LoraInit::Default => {
                // kaiming_uniform_(a = √5) on [r, in]: bound = gain·√(3/fan_in) with gain = √(2/(1+5)) = 1/√in.
                let bound = 1.0 / (d_in as f64).sqrt();
                rng.uniform([spec.r, d_in], -bound, bound, device)
            }
            LoraInit::Gaussian => rng.normal([spec.r, d_in], 0.0, 1.0 / spec.r as f64, device),
        };
        let b = Tensor::zeros([d_out, spec.r], device);
        LoraAdapter {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            dropout: DropoutConfig::new(spec.dropout).init(),
            scale: spec.scale,
            alpha: spec.alpha,
        }
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }

    /// The side path `scale · dropout(x) · Aᵀ · Bᵀ` for `x: [n, in]`, giving `[n, out]`.
    /// Two thin matmuls; the dense `B·A` is never formed.
    pub fn side(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = self.dropout.forward(x);
        x.matmul(self.lora_a.val().transpose())
            .matmul(self.lora_b.val().transpose())
            .mul_scalar(self.scale)
    }

    /// The dense update `scale · B · A`, `[out, in]` (for merging only).
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_b
            .val()
            .matmul(self.lora_a.val())
            .mul_scalar(self.scale)
    }
}

/// A linear layer `y = x·Wᵀ + b` with the weight in Hugging Face layout `[out, in]`
/// and an optional LoRA adapter on the side path.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// The weight, `[out, in]` (Hugging Face / PyTorch layout, not burn's `[in, out]`).
    pub weight: Param<Tensor<B, 2>>,
    /// The optional bias, `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The adapter, if this layer is targeted.
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    /// A layer with weights drawn from N(0, std²) (Hugging Face's `initializer_range` init) and zero bias.
    pub fn new(
        d_in: usize,
        d_out: usize,
        bias: bool,
        std: f64,
        rng: &mut InitRng,
        device: &B::Device,
    ) -> Self {
        let w = rng.normal([d_out, d_in], 0.0, std, device);
        Linear {
            weight: Param::from_tensor(w),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
            lora: None,
        }
    }

    /// Attaches a fresh adapter (replacing any existing one).
    pub fn with_lora(mut self, spec: &LoraSpec, rng: &mut InitRng) -> Self {
        let [d_out, d_in] = self.weight.dims();
        let device = self.weight.device();
        self.lora = Some(LoraAdapter::new(spec, d_in, d_out, rng, &device));
        self
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Applies the layer to `x: [.., in]`, giving `[.., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let n = dims[..D - 1].iter().product::<usize>();
        let x2: Tensor<B, 2> = x.reshape([n, d_in]);
        let mut y = x2.clone().matmul(self.weight.val().transpose());
        if let Some(b) = &self.bias {
            y = y + b.val().unsqueeze_dim(0);
        }
        if let Some(lora) = &self.lora {
            y = y + lora.side(x2);
        }
        let mut out = dims;
        out[D - 1] = self.d_out();
        y.reshape(out)
    }

    /// Folds the adapter into the base weight (`W ← W + scale·B·A`) and drops it.
    pub fn merge(mut self) -> Self {
        if let Some(lora) = self.lora.take() {
            let w = self.weight.val() + lora.delta();
            self.weight = Param::initialized(self.weight.id, w);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    fn spec(init: LoraInit) -> LoraSpec {
        LoraSpec {
            r: 4,
            alpha: 8.0,
            scale: 2.0,
            dropout: 0.0,
            dora: false,
            init,
        }
    }

    #[test]
    fn fresh_default_adapter_leaves_output_unchanged() {
        let dev = Default::default();
        let mut rng = InitRng::new(1);
        let plain = Linear::<B>::new(6, 5, true, 0.5, &mut rng, &dev);
        let x = rng.normal::<B, 3>([2, 3, 6], 0.0, 1.0, &dev);
        let before = plain.forward(x.clone()).into_data();
        let adapted = plain.with_lora(&spec(LoraInit::Default), &mut rng);
        let after = adapted.forward(x).into_data();
        assert_eq!(before, after);
    }

    #[test]
    fn side_path_equals_merged_weight() {
        let dev = Default::default();
        let mut rng = InitRng::new(2);
        let mut l = Linear::<B>::new(6, 5, false, 0.5, &mut rng, &dev)
            .with_lora(&spec(LoraInit::Gaussian), &mut rng);
        let lora = l.lora.as_mut().expect("attached");
        lora.lora_b = Param::from_tensor(rng.normal([5, 4], 0.0, 1.0, &dev));
        let x = rng.normal::<B, 2>([3, 6], 0.0, 1.0, &dev);
        let y = l.forward(x.clone());
        let merged = l.merge();
        assert!(merged.lora.is_none());
        let y2 = merged.forward(x);
        y.into_data()
            .assert_approx_eq::<f32>(&y2.into_data(), burn::tensor::Tolerance::absolute(1e-5));
    }
}
