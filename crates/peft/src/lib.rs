//! LoRA-family adapters for bellows: configuration, an adapter-ready linear layer (dense or with
//! a frozen NF4 base for QLoRA, see [`nf4`]), and Hugging Face PEFT's on-disk format.
//!
//! This crate depends on no other bellows crate: models build their linear layers from
//! [`Linear`] and ask a [`LoraPlan`] which of them get adapters.
//!
//! ```
//! use bellows_peft::{Linear, Method, PeftConfig};
//! use burn::backend::Flex;
//! let cfg = PeftConfig { method: Method::Lora, ..PeftConfig::default() };
//! let plan = cfg.plan().unwrap();
//! let spec = plan.spec_for("model.layers.0.self_attn.q_proj", false).unwrap();
//! let mut rng = bellows_peft::InitRng::new(0);
//! let q = Linear::<Flex>::new(16, 16, false, 0.02, &mut rng, &Default::default()).with_lora(&spec, &mut rng);
//! assert_eq!(q.lora.as_ref().unwrap().rank(), 8);
//! ```
#![warn(missing_docs)]

mod combine;
mod config;
mod dora;
mod dtype;
mod error;
pub mod fused;
mod init;
mod io;
mod linear;
pub mod nf4;
pub mod shard;

pub use combine::{combine_adapters, combined_config, AdapterSet, Combination, LinearSite};
pub use config::{layer_index, LoraInit, LoraPlan, LoraSpec, Method, PeftConfig, TargetModules};
pub use dtype::in_dtype;
pub use error::{Error, Result};
pub use init::InitRng;
pub use io::{adapter_config_json, parse_adapter_config, read_adapter_config};
pub use linear::{Linear, LoraAdapter};
pub use nf4::{Nf4Data, Nf4Options, Nf4Weight, QuantConfig};
pub use shard::{Collective, ShardGroup, Sharding};
