//! Reading PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`) into a [`CausalLm`].

use std::collections::HashSet;
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::io::{load_pretrained_quantized, peft_key};
use super::weights::WeightFiles;
use crate::config::ModelArch;
use crate::params::is_adapter_path;
use crate::{CausalLm, Error, Result};
use bellows_peft::{InitRng, Nf4Options, PeftConfig};

/// Loads the base model folder `base` and the PEFT adapter folder `adapter` on top of it: the
/// adapter layout (targets, ranks, rsLoRA scaling, DoRA) comes from `adapter_config.json`.
/// Returns the architecture, the adapter's config and the model (all parameters trainable; freeze
/// what you need).
///
/// # Errors
/// Unreadable or unsupported files, a non-LoRA adapter, or adapter tensors that are missing,
/// mis-shaped or belong to no adapted layer of this model (naming file and tensor).
pub fn load_pretrained_with_adapter<B: Backend>(
    base: &Path,
    adapter: &Path,
    device: &B::Device,
) -> Result<(ModelArch, PeftConfig, CausalLm<B>)> {
    load_pretrained_with_adapter_quantized(base, adapter, None, device)
}

/// [`load_pretrained_with_adapter`] with the base's decoder linears NF4-quantized as they are
/// read when `quantize` is set (QLoRA inference: a PEFT adapter on a 4-bit base).
///
/// # Errors
/// As [`load_pretrained_with_adapter`].
pub fn load_pretrained_with_adapter_quantized<B: Backend>(
    base: &Path,
    adapter: &Path,
    quantize: Option<Nf4Options>,
    device: &B::Device,
) -> Result<(ModelArch, PeftConfig, CausalLm<B>)> {
    let cfg = bellows_peft::read_adapter_config(adapter)?;
    let plan = cfg.plan()?;
    let (arch, model) =
        load_pretrained_quantized(base, &plan, quantize, &mut InitRng::new(0), device)?;
    let model = load_adapter(model, adapter)?;
    Ok((arch, cfg, model))
}

/// Replaces every adapter tensor of `model` with the one in `<dir>/adapter_model.safetensors`
/// (PEFT keys, see [`peft_key`]), and every base parameter the file has a `modules_to_save` copy of
/// (`base_model.model.<param path>`). The model must already have adapters of the adapter's layout
/// (build it with the plan of [`bellows_peft::read_adapter_config`]); ids and trainability are kept.
///
/// # Errors
/// A missing or mis-shaped tensor, or a tensor in the file that no adapter of the model uses.
pub fn load_adapter<B: Backend>(model: CausalLm<B>, dir: &Path) -> Result<CausalLm<B>> {
    let file = dir.join("adapter_model.safetensors");
    let files = WeightFiles::open_file(&file)?;
    struct Loader<'a> {
        files: &'a WeightFiles,
        stack: Vec<String>,
        used: HashSet<String>,
        err: Option<Error>,
    }
    impl<B: Backend> ModuleMapper<B> for Loader<'_> {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.pop();
        }
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let path = self.stack.join(".");
            if self.err.is_some() {
                return p;
            }
            let key = if is_adapter_path(&path) {
                peft_key(&path)
            } else {
                // A `modules_to_save` copy replaces the base parameter, when the file has one.
                let key = format!("base_model.model.{path}");
                if !self.files.contains(&key) {
                    return p;
                }
                key
            };
            match super::io::read_param(self.files, &key, &p) {
                Ok(new) => {
                    self.used.insert(key);
                    new
                }
                Err(e) => {
                    self.err = Some(e);
                    p
                }
            }
        }
    }
    let mut l = Loader {
        files: &files,
        stack: Vec::new(),
        used: HashSet::new(),
        err: None,
    };
    let model = model.map(&mut l);
    if let Some(e) = l.err {
        return Err(e);
    }
    let mut unused: Vec<&str> = files.names().filter(|n| !l.used.contains(*n)).collect();
    unused.sort_unstable();
    if let Some(first) = unused.first() {
        return Err(Error::Weights {
            path: file,
            tensor: (*first).to_string(),
            message: format!(
                "not used by any adapted layer ({} such tensors; does adapter_config.json match the file?)",
                unused.len()
            ),
        });
    }
    Ok(model)
}
