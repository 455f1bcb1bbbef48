//! Building the model a job trains: a Hugging Face folder or a random init, adapters, QLoRA's
//! NF4 bases, and (FSDP) sharded as it is built.

use burn::module::Module;
use burn::tensor::backend::Backend;

use bellows_models::{CausalLm, ModelArch};
use bellows_peft::{LoraPlan, ShardGroup};

use crate::config::RunConfig;
use crate::{Error, Result};

/// Builds the model the config asks for: a Hugging Face folder or a random init, with adapters
/// per `plan`, the base frozen when adapters are used, and NF4-quantized for `method = "qlora"`.
///
/// # Errors
/// The model folder cannot be read.
pub fn build_model<B: Backend>(
    cfg: &RunConfig,
    plan: &LoraPlan,
    device: &B::Device,
) -> Result<(ModelArch, CausalLm<B>)> {
    build_model_sharded(cfg, plan, device, None)
}

/// [`build_model`] for FSDP: with a `shard` group every rank keeps only its rows of each sharded
/// weight as soon as it is read or drawn, so no rank holds the whole model.
///
/// # Errors
/// As [`build_model`].
pub fn build_model_sharded<B: Backend>(
    cfg: &RunConfig,
    plan: &LoraPlan,
    device: &B::Device,
    shard: Option<&ShardGroup>,
) -> Result<(ModelArch, CausalLm<B>)> {
    let mut rng = bellows_peft::InitRng::new(cfg.run.seed);
    // QLoRA: decoder linears are NF4-quantized as they are read (or drawn).
    let quantize = cfg.peft.quant_config().map(|q| q.options());
    let (arch, model) = match (&cfg.model.path, &cfg.model.init) {
        (Some(dir), _) => bellows_models::load_pretrained_sharded::<B>(
            dir, plan, quantize, shard, &mut rng, device,
        )?,
        (None, Some(init)) => {
            let arch = init.arch();
            let m = CausalLm::new_sharded(&arch, plan, quantize, shard, &mut rng, device);
            (arch, m)
        }
        (None, None) => {
            return Err(Error::Internal(
                "validated config has neither model.path nor model.init".into(),
            ))
        }
    };
    let model = if plan.uses_adapters() {
        model.map(&mut bellows_models::TrainableMapper::new(|p: &str| {
            bellows_models::is_adapter_path(p) || plan.is_module_to_save(p)
        }))
    } else {
        model
    };
    Ok((arch, model))
}
