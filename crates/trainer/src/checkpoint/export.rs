//! `bellows export`: a checkpoint — consolidated or sharded, from any number of ranks — as a
//! plain Hugging Face model folder (full fine-tuning) or PEFT adapter folder (adapters).

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};

use super::load::{open_weights, verify_checkpoint};
use super::manifest::Manifest;
use super::params::{apply_params, Selection};
use crate::config::RunConfig;
use crate::{Error, Result};

/// Writes the checkpoint in `dir` to `<out>/model` (Hugging Face) or `<out>/adapter` (PEFT),
/// and returns that folder. The job is read from the checkpoint's own `config.toml`; the base
/// model it names (`model.path`) must be readable: it supplies the architecture, and with
/// adapters, the weights the adapter belongs to. Every file's hash is verified first.
///
/// # Errors
/// The checkpoint is incomplete or damaged, its config is unreadable, or the base model or the
/// output cannot be read / written.
pub fn export_checkpoint(dir: &Path, out: &Path) -> Result<PathBuf> {
    let m = Manifest::read(dir)?;
    let cfg_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = RunConfig::from_toml_str(&text, &cfg_path, &[]).map_err(|issues| {
        Error::CheckpointCorrupt {
            file: cfg_path.clone(),
            message: issues.to_string(),
        }
    })?;
    verify_checkpoint(dir, &cfg, m.world_size)?;
    let plan = cfg.peft.plan()?;
    let device = Default::default();
    let (arch, model) = crate::build::build_model::<Autodiff<Flex>>(&cfg, &plan, &device)?;
    let sel = if plan.uses_adapters() {
        Selection::Trainable
    } else {
        Selection::All
    };
    let reader = open_weights(dir, &m)?;
    let mut tensors = std::collections::HashMap::new();
    for name in reader.names() {
        let whole = reader.whole(&name)?;
        tensors.insert(name, whole);
    }
    let (model, mut problems) = apply_params(model, sel, &mut tensors);
    problems.extend(
        tensors
            .keys()
            .map(|k| format!("{k}: not a parameter of this model")),
    );
    if !problems.is_empty() {
        problems.sort();
        return Err(Error::CheckpointCorrupt {
            file: dir.to_path_buf(),
            message: format!("does not fit the model: {}", problems.join("; ")),
        });
    }
    crate::recipe::save_final(&model, &arch, &plan, &cfg, out)?;
    Ok(out.join(if plan.uses_adapters() {
        "adapter"
    } else {
        "model"
    }))
}
