//! Writing a checkpoint atomically: a temporary folder, every file fsynced, the manifest last,
//! the folder fsynced, one rename, the parent fsynced. A crash or a full disk at any moment leaves
//! either the old set of checkpoints or the old set plus the new one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;

use bellows_data::LoaderState;
use bellows_models::{CausalLm, ModelArch};
use bellows_peft::LoraPlan;

use super::manifest::{
    checkpoint_config_hash, sha256_hex, FileEntry, Manifest, FORMAT_VERSION, HASH_EXCLUDED,
    MANIFEST,
};
use super::params::{collect_optim, collect_params, param_paths, AdamWOptim, Selection};
use super::rotate::{checkpoints_dir, remove_stale_temps, rotate};
use super::sharded::{model_file, optimizer_file, ShardLayout};
use super::tensors::{dtype_name, serialize};
use crate::config::RunConfig;
use crate::{Accelerator, Error, Result};

/// What a checkpoint is taken of, besides the model and optimizer.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointCtx<'a> {
    /// The job.
    pub cfg: &'a RunConfig,
    /// Rank identity and collectives.
    pub acc: &'a Accelerator,
    /// The model's architecture (for the exported `config.json`).
    pub arch: &'a ModelArch,
    /// The adapter plan (decides adapter-only vs full weights).
    pub plan: &'a LoraPlan,
}

/// The optimizer whose state a checkpoint saves.
pub enum OptimRef<'a, B: AutodiffBackend> {
    /// burn's AdamW (DDP or one process).
    Burn(&'a AdamWOptim<CausalLm<B>, B>),
    /// ZeRO's sharded AdamW (gathered into the same format).
    Zero(&'a crate::zero::ZeroAdamW),
}

/// The training progress stored in a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainProgress {
    /// Optimizer steps completed.
    pub step: u64,
    /// Loss-counted training tokens seen (all ranks).
    pub tokens: u64,
    /// The loss of every completed step, in order.
    pub losses: Vec<f64>,
    /// This rank's data loader state after its last consumed batch.
    pub loader: LoaderState,
    /// fp16's loss scaler, when training in fp16.
    pub loss_scaler: Option<crate::precision::LossScaler>,
    /// Steps whose update was skipped (non-finite gradients or fp16 overflow).
    pub skipped_steps: u64,
}

/// The per-rank loader state file name.
pub(crate) fn loader_file(rank: usize) -> String {
    format!("loader-rank-{rank}.json")
}

/// A file of the checkpoint being written in `tmp` failed (e.g. the disk is full): say so, so
/// the user knows the previous checkpoint is still the latest one and intact.
fn unsaved(tmp: &Path, e: Error) -> Error {
    let (path, source) = match e {
        Error::Io { path, source } => (path, source),
        Error::Model(bellows_models::Error::Io { path, source }) => (path, source),
        other => return other,
    };
    Error::CheckpointWrite {
        path,
        message: format!(
            "{source}; this checkpoint is incomplete and ignored ({} is left for the next save to remove), the previous one is intact",
            tmp.display()
        ),
    }
}

/// Writes `bytes` to `path` and fsyncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| Error::io(path, e);
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// fsyncs a folder, so the names in it (new files, a rename) are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Saves a checkpoint of step `progress.step` into `<output_dir>/checkpoints/checkpoint-<step>`
/// and rotates old ones. Every rank must call it (each writes its loader state); rank 0 writes the
/// rest. Assumes the output folder is on a file system all ranks share.
///
/// # Errors
/// A file cannot be written or a collective fails.
pub fn save_checkpoint<B: AutodiffBackend>(
    ctx: CheckpointCtx<'_>,
    model: &CausalLm<B>,
    optim: OptimRef<'_, B>,
    progress: &TrainProgress,
) -> Result<PathBuf> {
    let root = checkpoints_dir(&ctx.cfg.run.output_dir);
    let name = format!("checkpoint-{}", progress.step);
    let dest = root.join(&name);
    let tmp = root.join(format!(".tmp-{name}"));
    if ctx.acc.is_main() {
        remove_stale_temps(&root)?;
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    ctx.acc.barrier()?;
    let state = serde_json::to_vec_pretty(&progress.loader)
        .map_err(|e| Error::Internal(format!("loader state does not serialise: {e}")))?;
    write_synced(&tmp.join(loader_file(ctx.acc.rank())), &state).map_err(|e| unsaved(&tmp, e))?;
    if model.is_sharded() {
        let OptimRef::Zero(z) = optim else {
            return Err(Error::Internal(
                "a sharded model is trained by the sharded optimizer".into(),
            ));
        };
        let layout = write_rank_files(ctx, model, z, &tmp).map_err(|e| unsaved(&tmp, e))?;
        ctx.acc.barrier()?;
        if ctx.acc.is_main() {
            write_main_files(ctx, model, Contents::Sharded(layout), progress, &tmp)
                .map_err(|e| unsaved(&tmp, e))?;
        }
        return finish(ctx, &root, &tmp, &dest);
    }
    // ZeRO's shards are gathered on every rank (a collective); the DDP optimizer is read by rank 0.
    let optim_tensors = match optim {
        OptimRef::Zero(z) => z.consolidated(ctx.acc.process_group())?,
        OptimRef::Burn(o) if ctx.acc.is_main() => collect_optim(model, o),
        OptimRef::Burn(_) => Vec::new(),
    };
    ctx.acc.barrier()?;
    if ctx.acc.is_main() {
        write_main_files(ctx, model, Contents::Whole(optim_tensors), progress, &tmp)
            .map_err(|e| unsaved(&tmp, e))?;
    }
    finish(ctx, &root, &tmp, &dest)
}

/// Rank 0 renames the finished temp folder into place and rotates; every rank waits for it.
fn finish(ctx: CheckpointCtx<'_>, root: &Path, tmp: &Path, dest: &Path) -> Result<PathBuf> {
    if ctx.acc.is_main() {
        if dest.exists() {
            std::fs::remove_dir_all(dest).map_err(|e| Error::io(dest, e))?;
        }
        std::fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))?;
        sync_dir(root)?;
        rotate(root, ctx.cfg.checkpoint.keep_last)?;
    }
    ctx.acc.barrier()?;
    Ok(dest.to_path_buf())
}

/// What rank 0 writes besides config, export and manifest.
enum Contents {
    /// `model.safetensors` and `optimizer.safetensors` with whole tensors (these optimizer ones).
    Whole(Vec<(String, burn::tensor::TensorData)>),
    /// Every rank already wrote its `model-rank-<r>` / `optimizer-rank-<r>` files, so laid out.
    Sharded(ShardLayout),
}

/// A sharded model's rank writes its rows: its rows of every sharded weight (rank 0 also the
/// whole tensors) and its rows of the optimizer state. Returns the layout (the same on every
/// rank).
fn write_rank_files<B: AutodiffBackend>(
    ctx: CheckpointCtx<'_>,
    model: &CausalLm<B>,
    zero: &crate::zero::ZeroAdamW,
    tmp: &Path,
) -> Result<ShardLayout> {
    // Shard-group rank (the node's under hybrid sharding); only the first replica writes.
    let (rank, main) = (zero.rank(), ctx.acc.is_main());
    let paths = param_paths(model);
    let mut split = BTreeMap::new();
    for p in model.sharded_params() {
        if let Some(path) = paths.get(&p.id) {
            split.insert(path.clone(), p.shape.to_vec());
        }
    }
    let selected = collect_params(model, selection(ctx.plan));
    // Frozen sharded bases are not saved with adapters: only saved tensors are laid out.
    split.retain(|name, _| selected.iter().any(|(n, _)| n == name));
    let weights: Vec<_> = selected
        .into_iter()
        .filter(|(name, _)| main || split.contains_key(name))
        .collect();
    let mut optim = Vec::new();
    for (name, data, global) in zero.own_tensors(main) {
        if name.ends_with(".exp_avg") || name.ends_with(".exp_avg_sq") {
            split.insert(name.clone(), global);
        }
        optim.push((name, data));
    }
    if zero.writes_shards() {
        for (file, tensors) in [(model_file(rank), weights), (optimizer_file(rank), optim)] {
            let path = tmp.join(file);
            write_synced(&path, &serialize(&path, &tensors)?)?;
        }
    }
    Ok(ShardLayout::new(zero.world(), split))
}

/// Full fine-tuning saves every parameter; adapter training only the trainable ones.
fn selection(plan: &LoraPlan) -> Selection {
    if plan.uses_adapters() {
        Selection::Trainable
    } else {
        Selection::All
    }
}

/// Rank 0's part: weights and optimizer (whole), config, export, manifest (last), all fsynced.
/// A sharded full fine-tune has no whole model to export: `bellows export` builds it.
fn write_main_files<B: AutodiffBackend>(
    ctx: CheckpointCtx<'_>,
    model: &CausalLm<B>,
    contents: Contents,
    progress: &TrainProgress,
    tmp: &Path,
) -> Result<()> {
    let adapters = ctx.plan.uses_adapters();
    let sel = selection(ctx.plan);
    let mut dtypes = BTreeMap::new();
    let shards = match contents {
        Contents::Whole(optim_tensors) => {
            for (file, tensors) in [
                ("model.safetensors", collect_params(model, sel)),
                ("optimizer.safetensors", optim_tensors),
            ] {
                let path = tmp.join(file);
                dtypes.insert(file.to_string(), dtype_names(&tensors));
                write_synced(&path, &serialize(&path, &tensors)?)?;
            }
            None
        }
        Contents::Sharded(layout) => {
            let model_dtypes = dtype_names(&collect_params(model, sel));
            for f in &layout.model_files {
                dtypes.insert(f.clone(), model_dtypes.clone());
            }
            for f in &layout.optimizer_files {
                dtypes.insert(f.clone(), vec!["f32".to_string(), "i64".to_string()]);
            }
            Some(layout)
        }
    };
    let cfg_path = tmp.join("config.toml");
    write_synced(&cfg_path, ctx.cfg.to_toml().as_bytes())?;
    // A sharded checkpoint's export needs whole tensors: the adapter is whole unless some
    // module is trained in full (and sharded) next to it; `bellows export` builds the rest.
    if shards.is_none() || (adapters && !ctx.plan.has_modules_to_save()) {
        crate::recipe::save_final(model, ctx.arch, ctx.plan, ctx.cfg, tmp)?;
        sync_dir(&tmp.join(if adapters { "adapter" } else { "model" }))?;
    }
    let mut files = BTreeMap::new();
    hash_tree(tmp, tmp, &mut files)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        bellows_version: env!("CARGO_PKG_VERSION").to_string(),
        config_hash: checkpoint_config_hash(ctx.cfg),
        config_hash_excludes: HASH_EXCLUDED.iter().map(|s| s.to_string()).collect(),
        world_size: ctx.acc.world_size(),
        step: progress.step,
        tokens: progress.tokens,
        losses: progress.losses.clone(),
        loss_scaler: progress.loss_scaler.clone(),
        skipped_steps: progress.skipped_steps,
        weights: if adapters { "trainable" } else { "full" }.into(),
        dtypes,
        loader_files: (0..ctx.acc.world_size()).map(loader_file).collect(),
        shards,
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Internal(format!("manifest does not serialise: {e}")))?;
    write_synced(&tmp.join(MANIFEST), &json)?;
    sync_dir(tmp)
}

/// The sorted distinct dtype names of `tensors`.
fn dtype_names(tensors: &[(String, burn::tensor::TensorData)]) -> Vec<String> {
    let mut names: Vec<String> = tensors.iter().map(|t| dtype_name(t.1.dtype)).collect();
    names.sort();
    names.dedup();
    names
}

/// Size and SHA-256 of every file under `dir` (relative to `base`, `/`-separated), except the manifest.
pub(crate) fn hash_tree(
    base: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, FileEntry>,
) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            hash_tree(base, &path, out)?;
            continue;
        }
        let rel = path
            .strip_prefix(base)
            .map_err(|_| {
                Error::Internal(format!("{} is outside {}", path.display(), base.display()))
            })?
            .to_string_lossy()
            .replace('\\', "/");
        if rel == MANIFEST {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        out.insert(
            rel,
            FileEntry {
                bytes: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
            },
        );
    }
    Ok(())
}
