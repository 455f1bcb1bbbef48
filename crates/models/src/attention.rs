//! Multi-head attention with grouped-query key/value heads (Ainslie et al. 2023):
//! query head `j` reads key/value head `j / (heads / kv_heads)`.

use bellows_peft::{InitRng, Linear, LoraPlan};

use crate::source::{BaseSource, LinearShape, RandomInit};
use burn::module::Module;
use burn::tensor::{backend::Backend, Bool, DType, Tensor, TensorData};

use crate::cache::LayerCache;
use crate::config::ModelArch;
use crate::rope::RopeTables;

/// The attention block: `q_proj`, `k_proj`, `v_proj`, `o_proj` (Hugging Face names).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection `[heads·head_dim, hidden]`.
    pub q_proj: Linear<B>,
    /// Key projection `[kv_heads·head_dim, hidden]`.
    pub k_proj: Linear<B>,
    /// Value projection `[kv_heads·head_dim, hidden]`.
    pub v_proj: Linear<B>,
    /// Output projection `[hidden, heads·head_dim]`.
    pub o_proj: Linear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The sliding window of this layer, if any: query `i` then attends keys `i − w < j ≤ i`.
    pub sliding_window: Option<usize>,
}

/// The linear layer at `path` from `src`, with an adapter where `plan` says.
pub(crate) fn linear<B: Backend>(
    src: &mut dyn BaseSource<B>,
    plan: &LoraPlan,
    path: String,
    shape: LinearShape,
    rng: &mut InitRng,
) -> crate::Result<Linear<B>> {
    let quantizable = !plan.is_module_to_save(&format!("{path}.weight"));
    let l = src.linear(&path, shape, quantizable, rng)?;
    Ok(match plan.spec_for(&path, false) {
        Some(spec) => l.with_lora(&spec, rng),
        None => l,
    })
}

impl<B: Backend> Attention<B> {
    /// A randomly initialised block for layer `layer`; adapters where `plan` says.
    pub fn new(
        arch: &ModelArch,
        plan: &LoraPlan,
        layer: usize,
        rng: &mut InitRng,
        device: &B::Device,
    ) -> Self {
        let mut src = RandomInit {
            std: arch.initializer_range,
            quantize: None,
            device,
        };
        Self::build(arch, plan, layer, &mut src, rng).expect("the random init cannot fail")
    }

    /// The block for layer `layer` with base weights from `src`; adapters where `plan` says.
    ///
    /// # Errors
    /// `src` cannot provide a weight.
    pub fn build(
        arch: &ModelArch,
        plan: &LoraPlan,
        layer: usize,
        src: &mut dyn BaseSource<B>,
        rng: &mut InitRng,
    ) -> crate::Result<Self> {
        let (d, hd) = (arch.hidden_size, arch.head_dim);
        let (h, kv) = (arch.num_attention_heads, arch.num_key_value_heads);
        let p = |n: &str| format!("model.layers.{layer}.self_attn.{n}");
        let b = arch.attention_bias;
        Ok(Attention {
            q_proj: linear(src, plan, p("q_proj"), (d, h * hd, b), rng)?,
            k_proj: linear(src, plan, p("k_proj"), (d, kv * hd, b), rng)?,
            v_proj: linear(src, plan, p("v_proj"), (d, kv * hd, b), rng)?,
            o_proj: linear(src, plan, p("o_proj"), (h * hd, d, false), rng)?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
            sliding_window: arch.window_of(layer),
        })
    }

    /// Attends `x: [batch, seq, hidden]`. `mask` is `[batch, 1, seq, keys]`, true where attention
    /// is forbidden; `cache` (generation) holds earlier keys/values and receives the new ones.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let heads = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        let window = self.sliding_window;
        let out = match cache {
            None => {
                match crate::fused::attention::attention((q, k, v), rope, mask, window, heads) {
                    Ok(out) => out,
                    Err(qkv) => attend(qkv, rope, mask, window, heads, None),
                }
            }
            Some(cache) => attend((q, k, v), rope, mask, window, heads, Some(cache)),
        };
        self.o_proj.forward(out)
    }
}

/// The attention of projected `q: [b, s, h·hd]` over `k`, `v: [b, s, kv·hd]` as a composition
/// of burn ops (any backend, any dtype, with a generation cache); the result is `[b, s, h·hd]`.
/// `crate::fused::attention` computes the same in one op where it can.
pub(crate) fn attend<B: Backend>(
    (q, k, v): (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>),
    rope: &RopeTables<B>,
    mask: Option<&Tensor<B, 4, Bool>>,
    window: Option<usize>,
    (h, kv, hd): (usize, usize, usize),
    cache: Option<&mut LayerCache<B>>,
) -> Tensor<B, 3> {
    let [b, s, _] = q.dims();
    let q = q.reshape([b, s, h, hd]).swap_dims(1, 2);
    let k = k.reshape([b, s, kv, hd]).swap_dims(1, 2);
    let v = v.reshape([b, s, kv, hd]).swap_dims(1, 2);
    let q = rope.apply(q);
    let mut k = rope.apply(k);
    let mut v = v;
    if let Some(cache) = cache {
        (k, v) = cache.append(k, v);
    }
    let t = k.dims()[2];
    let rep = h / kv;
    let (k, v) = if rep == 1 {
        (k, v)
    } else {
        let grow = |z: Tensor<B, 4>| {
            z.unsqueeze_dim::<5>(2)
                .expand([b, kv, rep, t, hd])
                .reshape([b, h, t, hd])
        };
        (grow(k), grow(v))
    };
    let dtype = q.dtype();
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let scores = if dtype == DType::F32 {
        scores
    } else {
        scores.cast(DType::F32)
    };
    let band = window.and_then(|w| window_mask::<B>(s, t, w, &scores.device()));
    let mask = match (mask, band) {
        (Some(m), Some(w)) => Some(m.clone().bool_or(w.expand([b, 1, s, t]))),
        (Some(m), None) => Some(m.clone()),
        (None, band) => band,
    };
    let scores = match mask {
        Some(m) => scores.mask_fill(m.expand([b, h, s, t]), f32::NEG_INFINITY),
        None => scores,
    };
    let probs = crate::fused::softmax::softmax_last(scores);
    let probs = if dtype == DType::F32 {
        probs
    } else {
        probs.cast(dtype)
    };
    probs.matmul(v).swap_dims(1, 2).reshape([b, s, h * hd])
}

/// `[1, 1, s, t]`, true where the `s` newest of `t` positions may not see a key because it lies
/// `window` or more positions back (query at `t − s + i`, key `j`: `t − s + i − j >= window`);
/// `None` when no pair is that far apart.
fn window_mask<B: Backend>(
    s: usize,
    t: usize,
    window: usize,
    device: &B::Device,
) -> Option<Tensor<B, 4, Bool>> {
    if t <= window {
        return None;
    }
    let past = t - s;
    let m: Vec<bool> = (0..s)
        .flat_map(|i| (0..t).map(move |j| past + i >= j + window))
        .collect();
    Some(Tensor::from_data(TensorData::new(m, [1, 1, s, t]), device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn window_mask_follows_transformers_off_by_one() {
        // Window 2 over 4 positions: query 3 sees keys 2 and 3 only (3 - 2 < j).
        let m = window_mask::<Flex>(4, 4, 2, &Default::default()).expect("some pairs too far");
        let v = m.into_data().to_vec::<bool>().expect("bool");
        let row = |i: usize| v[i * 4..i * 4 + 4].to_vec();
        assert_eq!(row(0), [false; 4]);
        assert_eq!(row(3), [true, true, false, false]);
        // One cached step: the new query is position 5 of 6.
        let m = window_mask::<Flex>(1, 6, 4, &Default::default()).expect("far keys");
        let v = m.into_data().to_vec::<bool>().expect("bool");
        assert_eq!(v, [true, true, false, false, false, false]);
        assert!(window_mask::<Flex>(3, 4, 4, &Default::default()).is_none());
    }
}
