//! An adapter-ready linear layer: a (possibly frozen) base weight, dense or NF4-quantized, plus an
//! optional LoRA side path.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::dtype::in_dtype;

use crate::config::{LoraInit, LoraSpec};
use crate::dora;
use crate::init::InitRng;
use crate::nf4::{quantize_nf4, Nf4Data, Nf4Options, Nf4Weight};
use crate::shard::{gather_nf4, shard_nf4, sharded_matmul_t, sharded_nf4_matmul_t};
use crate::shard::{ShardGroup, Sharding};

/// A LoRA adapter: `ΔW = scale · B · A` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").
///
/// Stored in PEFT's layout: `lora_a` is `[r, in]` and `lora_b` is `[out, r]`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// The down projection A, `[r, in]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// The up projection B, `[out, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// DoRA's magnitude vector `[out]` (Liu et al. 2024), `None` for plain LoRA.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
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
            // Placeholder: `Linear::with_lora` sets it to the row norms of the base weight.
            magnitude: spec
                .dora
                .then(|| Param::from_tensor(Tensor::ones([d_out], device))),
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
        self.project(self.dropout.forward(x))
    }

    /// `scale · x · Aᵀ · Bᵀ` without dropout.
    /// Computed in `x`'s dtype (the adapter's f32 weights are cast for a bf16/f16 input).
    pub(crate) fn project(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let dt = x.dtype();
        x.matmul(in_dtype(self.lora_a.val(), dt).transpose())
            .matmul(in_dtype(self.lora_b.val(), dt).transpose())
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
/// and an optional LoRA / DoRA adapter on the side path.
///
/// The base weight is either dense (`weight`, a parameter) or a frozen NF4 weight (`nf4`, QLoRA),
/// never both except while an adapter is merged into a quantized base
/// ([`Linear::merge_in_place`]), when `weight` holds the merged dense weight.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// The dense weight, `[out, in]` (Hugging Face / PyTorch layout, not burn's `[in, out]`);
    /// `None` when the base is quantized.
    pub weight: Option<Param<Tensor<B, 2>>>,
    /// The NF4-quantized frozen base (QLoRA); not a parameter, so it gets no gradient.
    pub nf4: Option<Nf4Weight<B>>,
    /// The optional bias, `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The adapter, if this layer is targeted.
    pub lora: Option<LoraAdapter<B>>,
    /// Whether the adapter is currently folded into `weight` ([`Linear::merge_in_place`]); the side
    /// path is then skipped until [`Linear::unmerge`].
    pub merged: bool,
    /// DoRA only: the detached row norms `‖W + s·B·A‖` used by the merge, kept to unmerge exactly.
    pub merged_norm: Vec<f32>,
    /// FSDP: `weight` holds only this rank's rows and is gathered on use ([`Linear::shard`]).
    #[module(skip)]
    pub sharding: Option<Sharding>,
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
        Linear::from_weight(w, bias.then(|| Tensor::zeros([d_out], device)))
    }

    /// A plain layer from a `[out, in]` weight and an optional `[out]` bias (both trainable).
    pub fn from_weight(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Linear {
            weight: Some(Param::from_tensor(weight)),
            nf4: None,
            bias: bias.map(Param::from_tensor),
            lora: None,
            merged: false,
            merged_norm: Vec::new(),
            sharding: None,
        }
    }

    /// A layer with a frozen NF4 base (uploaded from `data`, which must be 2-D `[out, in]` and
    /// pass [`Nf4Data::validate`]) and an optional trainable `[out]` bias.
    pub fn from_nf4(data: &Nf4Data, bias: Option<Tensor<B, 1>>, device: &B::Device) -> Self {
        Linear {
            weight: None,
            nf4: Some(Nf4Weight::from_data(data, device)),
            bias: bias.map(Param::from_tensor),
            lora: None,
            merged: false,
            merged_norm: Vec::new(),
            sharding: None,
        }
    }

    /// Replaces a dense base weight by its NF4 quantization (bit-exact with bitsandbytes); the
    /// bias and adapter are kept. A no-op when already quantized. Merge state is not kept: call it
    /// on an unmerged layer.
    pub fn quantize(mut self, opts: Nf4Options) -> Self {
        let Some(w) = self.weight.take() else {
            return self;
        };
        let w = w.val();
        let device = w.device();
        let shape = w.dims();
        let values = w
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("converted to f32");
        let data = quantize_nf4(&values, &shape, opts);
        self.nf4 = Some(Nf4Weight::from_data(&data, &device));
        self
    }

    /// Whether the base weight is quantized.
    pub fn is_quantized(&self) -> bool {
        self.nf4.is_some()
    }

    /// The base weight `[out, in]` as a dense tensor: the parameter, or the dequantized NF4
    /// weight (a constant outside the autodiff graph).
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        match (&self.weight, &self.nf4) {
            (Some(w), _) => match &self.sharding {
                // Gathered outside the autodiff graph (DoRA's norm and merges are detached).
                Some(s) => {
                    let w = w.val();
                    s.gather(w.clone().detach(), w.dtype())
                }
                None => w.val(),
            },
            (None, Some(q)) => match &self.sharding {
                Some(s) => gather_nf4(q, s).dequantize(),
                None => q.dequantize(),
            },
            (None, None) => unreachable!("a Linear has a dense or a quantized weight"),
        }
    }

    /// `x · Wᵀ` for `x: [n, in]` with the base weight only (no bias, no adapter), computed in `x`'s
    /// dtype (the weight is cast, as for mixed precision). With an NF4
    /// base the weight is dequantized on the fly and not kept for the backward pass.
    pub fn base_forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match (&self.weight, &self.nf4) {
            (Some(w), _) => match &self.sharding {
                Some(s) => sharded_matmul_t(x, w.val(), s),
                None => {
                    let dt = x.dtype();
                    x.matmul(in_dtype(w.val(), dt).transpose())
                }
            },
            (None, Some(q)) => match &self.sharding {
                Some(s) => sharded_nf4_matmul_t(x, q, s),
                None => q.matmul_t(x),
            },
            (None, None) => unreachable!("a Linear has a dense or a quantized weight"),
        }
    }

    /// FSDP: keeps only this rank's rows of the dense base weight (same parameter id, same
    /// trainability); the forward pass gathers it ([`crate::shard`]). Bias and adapter stay whole.
    /// An NF4 base (QLoRA) is sharded at quantization-block boundaries and stays whole when rows
    /// do not fall on them ([`crate::shard`]). A no-op for an already sharded layer. Merging,
    /// quantizing and DoRA's magnitude init expect an unsharded layer: call [`Linear::unshard`]
    /// first.
    pub fn shard(mut self, group: &ShardGroup) -> Self {
        if self.sharding.is_some() {
            return self;
        }
        if let Some(q) = &self.nf4 {
            let sharding = group.sharding(q.d_out);
            if let Some(mine) = shard_nf4(q, sharding.my_rows()) {
                self.nf4 = Some(mine);
                self.sharding = Some(sharding);
            }
            return self;
        }
        if let Some(w) = self.weight.take() {
            let grad = w.is_require_grad();
            let full = w.val();
            self.sharding = Some(group.sharding(full.dims()[0]));
            let mine = group.shard(full).detach();
            self.weight = Some(Param::initialized(w.id, mine).set_require_grad(grad));
        }
        self
    }

    /// FSDP: starts gathering the sharded base weight ahead of its use ([`Sharding::prefetch`]);
    /// a no-op for an unsharded layer or a group without prefetching.
    pub fn prefetch(&self) {
        if let (Some(s), Some(w), None) = (&self.sharding, &self.weight, &self.nf4) {
            s.prefetch(w.val());
        }
    }

    /// Undoes [`Linear::shard`]: the whole weight again, gathered from every rank (a collective:
    /// every rank must call it). A no-op when not sharded.
    pub fn unshard(mut self) -> Self {
        let Some(s) = self.sharding.take() else {
            return self;
        };
        if let Some(q) = self.nf4.take() {
            self.nf4 = Some(gather_nf4(&q, &s));
            return self;
        }
        if let Some(w) = self.weight.take() {
            let grad = w.is_require_grad();
            let mine = w.val();
            let full = s.gather(mine.clone().detach(), mine.dtype());
            self.weight = Some(Param::initialized(w.id, full).set_require_grad(grad));
        }
        self
    }

    /// Attaches a fresh adapter (replacing any existing one). A DoRA adapter's magnitude starts
    /// as the row norms of the weight, as PEFT initialises it.
    pub fn with_lora(mut self, spec: &LoraSpec, rng: &mut InitRng) -> Self {
        let (d_out, d_in) = (self.d_out(), self.d_in());
        let device = self.device();
        self.lora = Some(LoraAdapter::new(spec, d_in, d_out, rng, &device));
        self.merged = false;
        self.merged_norm.clear();
        self.init_dora_magnitude()
    }

    /// Resets a DoRA magnitude to `‖W + s·B·A‖` per output row (a no-op for LoRA or no adapter).
    /// Call it after replacing the base weight of a fresh DoRA adapter.
    pub fn init_dora_magnitude(mut self) -> Self {
        let is_dora = self.lora.as_ref().is_some_and(|l| l.magnitude.is_some());
        if !is_dora {
            return self;
        }
        let w = self.dense_weight();
        if let Some(lora) = self.lora.as_mut() {
            if let Some(m) = lora.magnitude.take() {
                let norm = dora::weight_norm(w, lora);
                let grad = m.is_require_grad();
                lora.magnitude = Some(Param::initialized(m.id, norm).set_require_grad(grad));
            }
        }
        self
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        match (&self.weight, &self.nf4) {
            (Some(w), _) => w.dims()[1],
            (None, Some(q)) => q.d_in,
            (None, None) => unreachable!("a Linear has a dense or a quantized weight"),
        }
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        match (&self.weight, &self.nf4) {
            _ if self.sharding.is_some() => self.sharding.as_ref().map_or(0, |s| s.rows),
            (Some(w), _) => w.dims()[0],
            (None, Some(q)) => q.d_out,
            (None, None) => unreachable!("a Linear has a dense or a quantized weight"),
        }
    }

    fn device(&self) -> B::Device {
        match (&self.weight, &self.nf4) {
            (Some(w), _) => w.device(),
            (None, Some(q)) => q.packed.device(),
            (None, None) => unreachable!("a Linear has a dense or a quantized weight"),
        }
    }

    /// Applies the layer to `x: [.., in]`, giving `[.., out]`.
    ///
    /// LoRA: `y = W·x + b + s·B·A·x`. DoRA, as PEFT computes it:
    /// `y = W·x + b + (m/n − 1)·W·x' + (m/n)·s·B·A·x'` with `x' = dropout(x)` and
    /// `n = ‖W + s·B·A‖` per output row, detached (DoRA paper §4.3). The dense `W + s·B·A` is only
    /// formed for DoRA's norm, outside the autodiff graph.
    ///
    /// The product is computed in `x`'s dtype: weights stored in another dtype (f32 masters under
    /// bf16/f16 mixed precision) are cast on use, so gradients reach them in their own dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let n = dims[..D - 1].iter().product::<usize>();
        let x2: Tensor<B, 2> = x.reshape([n, d_in]);
        let mut y = match self.fused_forward(x2) {
            Ok(y) => y,
            Err(x2) => self.composed_forward(x2),
        };
        if let Some(b) = &self.bias {
            let dt = y.dtype();
            y = y + in_dtype(b.val(), dt).unsqueeze_dim(0);
        }
        let mut out = dims;
        out[D - 1] = self.d_out();
        y.reshape(out)
    }

    /// Base product and plain LoRA side path as one op ([`crate::fused::linear_lora`], or
    /// [`crate::fused::linear_lora_nf4`] on an NF4 base) where the backend and dtype allow: an
    /// unsharded weight and no DoRA or adapter dropout.
    fn fused_forward(&self, x2: Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
        if self.sharding.is_some() {
            return Err(x2);
        }
        let side = match &self.lora {
            Some(l) if !self.merged => {
                if l.magnitude.is_some() || l.dropout.prob != 0.0 {
                    return Err(x2);
                }
                Some((l.lora_a.val(), l.lora_b.val(), l.scale))
            }
            _ => None,
        };
        match (&self.weight, &self.nf4) {
            (Some(w), _) => crate::fused::linear_lora(x2, w.val(), side).map_err(|(x, _, _)| x),
            (None, Some(q)) => crate::fused::linear_lora_nf4(x2, q, side).map_err(|(x, _)| x),
            (None, None) => Err(x2),
        }
    }

    /// The forward pass without bias as a composition of burn ops (every case).
    fn composed_forward(&self, x2: Tensor<B, 2>) -> Tensor<B, 2> {
        let dt = x2.dtype();
        let mut y = self.base_forward(x2.clone());
        match &self.lora {
            Some(lora) if !self.merged => match &lora.magnitude {
                None => y = y + lora.side(x2),
                Some(m) => {
                    // The norm and m/n stay in the master dtype; only the product is cast.
                    let w = self.dense_weight();
                    let scale: Tensor<B, 2> =
                        in_dtype(m.val() / dora::weight_norm(w, lora), dt).unsqueeze_dim(0);
                    let xd = lora.dropout.forward(x2);
                    let wx = if lora.dropout.prob == 0.0 {
                        y.clone()
                    } else {
                        self.base_forward(xd.clone())
                    };
                    y = y + wx * scale.clone().sub_scalar(1.0) + lora.project(xd) * scale;
                }
            },
            _ => {}
        }
        y
    }

    /// The merged weight: `W + s·B·A` (LoRA) or `(m/n)·(W + s·B·A)` (DoRA), with DoRA's norms.
    fn merged_weight(&self, lora: &LoraAdapter<B>) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let w = self.dense_weight();
        let sum = w.clone() + lora.delta();
        match &lora.magnitude {
            None => (sum, None),
            Some(m) => {
                let norm = dora::weight_norm(w, lora);
                let factor: Tensor<B, 2> = (m.val() / norm.clone()).unsqueeze_dim(1);
                (sum * factor, Some(norm))
            }
        }
    }

    fn set_weight(&mut self, w: Tensor<B, 2>) {
        self.weight = Some(match self.weight.take() {
            Some(p) => {
                let grad = p.is_require_grad();
                Param::initialized(p.id, w).set_require_grad(grad)
            }
            // The merged weight of a quantized base: frozen, like the base.
            None => Param::from_tensor(w).set_require_grad(false),
        });
    }

    /// Folds the adapter into the base weight and drops it (PEFT's `merge_and_unload`).
    /// A quantized base becomes dense: the dequantized base plus the update.
    pub fn merge(self) -> Self {
        let mut l = self.merge_in_place();
        l.lora = None;
        l.merged = false;
        l.merged_norm.clear();
        l.nf4 = None;
        l
    }

    /// Folds the adapter into the base weight but keeps it, so [`Linear::unmerge`] can restore
    /// the base (PEFT's `merge_adapter`). The forward then uses the merged weight alone. With a
    /// quantized base the merged weight is dense and the NF4 base is kept for an exact unmerge.
    pub fn merge_in_place(mut self) -> Self {
        if self.merged {
            return self;
        }
        let Some(lora) = self.lora.take() else {
            return self;
        };
        let (w, norm) = self.merged_weight(&lora);
        self.set_weight(w.detach());
        self.merged_norm = norm
            .map(|n| {
                n.into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        self.lora = Some(lora);
        self.merged = true;
        self
    }

    /// Undoes [`Linear::merge_in_place`]: `W ← W − s·B·A` (LoRA) or `W ← W·(n/m) − s·B·A` (DoRA).
    /// A no-op when not merged.
    pub fn unmerge(mut self) -> Self {
        if !self.merged {
            return self;
        }
        if self.nf4.is_some() {
            // The quantized base was never touched: drop the merged dense weight.
            self.weight = None;
            self.merged = false;
            self.merged_norm.clear();
            return self;
        }
        let Some(lora) = self.lora.take() else {
            return self;
        };
        let mut w = self.dense_weight();
        if let Some(m) = &lora.magnitude {
            let device = w.device();
            let n = self.merged_norm.len();
            let norm = Tensor::<B, 1>::from_data(
                burn::tensor::TensorData::new(std::mem::take(&mut self.merged_norm), [n]),
                &device,
            );
            let factor: Tensor<B, 2> = (norm / m.val()).unsqueeze_dim(1);
            w = w * factor;
        }
        self.set_weight((w - lora.delta()).detach());
        self.lora = Some(lora);
        self.merged = false;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Tolerance;

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
            .assert_approx_eq::<f32>(&y2.into_data(), Tolerance::absolute(1e-5));
    }

    fn dora_layer(rng: &mut InitRng) -> Linear<B> {
        let dev = Default::default();
        let mut s = spec(LoraInit::Gaussian);
        s.dora = true;
        let mut l = Linear::<B>::new(6, 5, true, 0.5, rng, &dev).with_lora(&s, rng);
        let lora = l.lora.as_mut().expect("attached");
        lora.lora_b = Param::from_tensor(rng.normal([5, 4], 0.0, 1.0, &dev));
        let m = lora.magnitude.take().expect("dora").val();
        lora.magnitude = Some(Param::from_tensor(m.mul_scalar(1.3)));
        l
    }

    #[test]
    fn fresh_dora_adapter_starts_at_the_row_norms_and_is_a_no_op() {
        let dev = Default::default();
        let mut rng = InitRng::new(3);
        let mut s = spec(LoraInit::Default);
        s.dora = true;
        let plain = Linear::<B>::new(6, 5, false, 0.5, &mut rng, &dev);
        let x = rng.normal::<B, 2>([3, 6], 0.0, 1.0, &dev);
        let before = plain.forward(x.clone());
        let norms = plain
            .dense_weight()
            .powf_scalar(2.0)
            .sum_dim(1)
            .sqrt()
            .reshape([5]);
        let adapted = plain.with_lora(&s, &mut rng);
        let m = adapted
            .lora
            .as_ref()
            .and_then(|l| l.magnitude.as_ref())
            .expect("dora");
        m.val()
            .into_data()
            .assert_approx_eq::<f32>(&norms.into_data(), Tolerance::absolute(1e-6));
        adapted
            .forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&before.into_data(), Tolerance::absolute(1e-5));
    }

    #[test]
    fn dora_merge_keeps_outputs_and_unmerge_restores_the_weight() {
        let dev = Default::default();
        let mut rng = InitRng::new(4);
        let l = dora_layer(&mut rng);
        let w0 = l.dense_weight().into_data();
        let x = rng.normal::<B, 2>([3, 6], 0.0, 1.0, &dev);
        let y = l.forward(x.clone()).into_data();
        let merged = l.merge_in_place();
        assert!(merged.merged);
        merged
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&y, Tolerance::absolute(1e-5));
        let restored = merged.unmerge();
        assert!(!restored.merged);
        restored
            .dense_weight()
            .into_data()
            .assert_approx_eq::<f32>(&w0, Tolerance::absolute(1e-6));
        restored
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&y, Tolerance::absolute(1e-5));
        let unloaded = restored.merge();
        assert!(unloaded.lora.is_none());
        unloaded
            .forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&y, Tolerance::absolute(1e-5));
    }
}
