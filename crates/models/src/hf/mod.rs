//! Hugging Face model folders: `config.json` + safetensors in, the same out.

mod adapter;
mod config;
mod io;
mod source;
mod weights;

pub use adapter::{
    load_adapter, load_pretrained_with_adapter, load_pretrained_with_adapter_quantized,
};
pub use config::{parse_config, to_config_json};
pub use io::{
    load_pretrained, load_pretrained_quantized, load_pretrained_sharded, load_pretrained_with,
    load_weights, peft_key, read_arch, save_adapter, save_pretrained, state_dict,
    write_safetensors,
};
pub use source::CheckpointSource;
pub use weights::{HostTensor, WeightFiles};
