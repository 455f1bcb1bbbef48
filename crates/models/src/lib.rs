//! Llama-family decoder models (Llama 2/3, Mistral, Qwen2) in burn, with Hugging Face parameter
//! paths, so checkpoints and PEFT adapters map one-to-one.
//!
//! Depends on `bellows-peft` (for the adapter-ready [`bellows_peft::Linear`]) and on no other
//! bellows crate.
//!
//! ```
//! use bellows_models::{tiny_arch, CausalLm, ForwardInput};
//! use bellows_peft::LoraPlan;
//! use burn::{backend::Flex, tensor::{Int, Tensor}};
//! let dev = Default::default();
//! let m = CausalLm::<Flex>::new(&tiny_arch(), &LoraPlan::none(), &mut bellows_peft::InitRng::new(0), &dev);
//! let ids = Tensor::<Flex, 2, Int>::from_ints([[1, 2, 3]], &dev);
//! let logits = m.forward(ids, &ForwardInput { positions: &[0, 1, 2], segments: None, compute: None });
//! assert_eq!(logits.dims(), [1, 3, 64]);
//! ```
#![warn(missing_docs)]

mod adapter_set;
mod attention;
mod cache;
mod config;
mod error;
mod fused;
mod generate;
pub mod hf;
mod loss;
mod mlp;
mod model;
mod norm;
mod params;
mod peft_model;
mod rope;
mod shard;
mod source;

pub use adapter_set::{linear_sites, read_adapter_set, save_adapter_set};
pub use attention::Attention;
pub use cache::{KvCache, LayerCache};
pub use config::{Family, ModelArch, RopeScaling, SlidingWindow};
pub use error::{Error, Result};
pub use generate::{generate, pick_token, probabilities, GenerateOptions};
pub use hf::{
    load_adapter, load_pretrained, load_pretrained_quantized, load_pretrained_sharded,
    load_pretrained_with, load_pretrained_with_adapter, load_pretrained_with_adapter_quantized,
    read_arch, save_adapter, save_pretrained,
};
pub use loss::{causal_lm_loss_sum, count_label_tokens, LossSum, IGNORE_INDEX};
pub use mlp::Mlp;
pub use model::{attention_mask, CausalLm, Decoder, DecoderLayer, ForwardInput};
pub use norm::RmsNorm;
pub use params::{is_adapter_path, ParamInfo, ParamLister, TrainableMapper};
pub use peft_model::{
    load_pretrained_with_weighted_adapters, load_pretrained_with_weighted_adapters_quantized,
    PeftModel,
};
pub use rope::{inv_freq, RopeTables};
pub use shard::{ShardedParam, ShardingSource};
pub use source::{BaseSource, LinearShape, RandomInit};

/// A tiny architecture (vocab 64, hidden 32, 2 layers, GQA 4/2) for tests and examples.
pub fn tiny_arch() -> ModelArch {
    ModelArch {
        family: Family::Llama,
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        attention_bias: false,
        initializer_range: 0.02,
        bos_token_id: None,
        eos_token_id: None,
        sliding_window: None,
    }
}
