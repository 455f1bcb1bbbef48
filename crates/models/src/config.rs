//! The resolved architecture of a Llama-family decoder.

use serde::{Deserialize, Serialize};

/// Which Hugging Face architecture a model follows (they share one implementation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 2 / 3 (`model_type = "llama"`).
    #[default]
    Llama,
    /// Mistral (`"mistral"`).
    Mistral,
    /// Qwen2 (`"qwen2"`): bias on q/k/v.
    Qwen2,
}

impl Family {
    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }

    /// The `architectures` entry of `config.json`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1's piecewise scaling of the inverse frequencies.
    Llama3 {
        /// Scale factor for long wavelengths.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// The context length the base model was trained with.
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (linear interpolation).
    Linear {
        /// The divisor.
        factor: f64,
    },
}

/// Sliding-window attention (Mistral; Qwen2 with `use_sliding_window`): in a windowed layer,
/// query position `i` attends key position `j` only when `i − size < j ≤ i` (transformers'
/// `sliding_window_overlay`: `kv_idx > q_idx − sliding_window`, on top of the causal mask).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingWindow {
    /// The window `sliding_window`, >= 1: a query sees itself and the `size − 1` positions before it.
    pub size: usize,
    /// Per decoder layer, whether it uses the window (Mistral: every layer; Qwen2: `layer_types`,
    /// or the layers `i >= max_window_layers`).
    pub layers: Vec<bool>,
}

/// A Llama-family decoder's architecture, resolved (every value present, typed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelArch {
    /// The architecture family.
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest position the model supports.
    pub max_position_embeddings: usize,
    /// The output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2).
    pub attention_bias: bool,
    /// Std of the normal init of weights (Hugging Face `initializer_range`).
    pub initializer_range: f64,
    /// Beginning-of-sequence token id, if known.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, if known.
    pub eos_token_id: Option<u32>,
    /// Sliding-window attention, if any (`None`: every layer attends to all earlier positions).
    #[serde(default)]
    pub sliding_window: Option<SlidingWindow>,
}

impl ModelArch {
    /// The attention window of decoder layer `layer`, if it is a sliding-window layer.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        let w = self.sliding_window.as_ref()?;
        w.layers
            .get(layer)
            .copied()
            .unwrap_or(false)
            .then_some(w.size)
    }

    /// Checks internal consistency; every problem as `(key, message)` relative to `at`.
    pub fn validate(&self, at: &str, out: &mut Vec<(String, String)>) {
        let mut bad = |k: &str, m: String| out.push((format!("{at}.{k}"), m));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                bad(k, "must be >= 1, got 0".into());
            }
        }
        if self.num_key_value_heads > 0
            && !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            bad(
                "num_key_value_heads",
                format!(
                    "must divide num_attention_heads ({}), got {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bad(
                "head_dim",
                format!("must be even for RoPE, got {}", self.head_dim),
            );
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            bad(
                "rms_norm_eps",
                format!("must be > 0, got {}", self.rms_norm_eps),
            );
        }
        if let Some(w) = &self.sliding_window {
            if w.size == 0 {
                bad("sliding_window", "must be >= 1, got 0".into());
            }
            if w.layers.len() != self.num_hidden_layers {
                bad(
                    "layer_types",
                    format!(
                        "{} entries for {} layers",
                        w.layers.len(),
                        self.num_hidden_layers
                    ),
                );
            }
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            bad(
                "rope_theta",
                format!("must be > 0, got {}", self.rope_theta),
            );
        }
    }

    /// Number of parameters of the model (embedding, layers, norm and untied head).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = d * q + 2 * d * kv + q * d + bias;
        let mlp = 3 * d * self.intermediate_size;
        let layer = attn + mlp + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }

    /// Approximate training FLOPs per token of a full forward+backward pass
    /// (6 × matmul parameters + attention score/value matmuls, Kaplan et al. / PaLM appendix B).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size;
        let matmul_params = self.num_hidden_layers * per_layer + self.vocab_size * d;
        let attn = 2 * self.num_hidden_layers * q * seq_len; // QKᵀ and PV, causal half counted fully
        6.0 * matmul_params as f64 + 6.0 * attn as f64
    }
}
