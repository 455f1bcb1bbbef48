//! Resuming: find the checkpoint, verify it (format, every file's size and SHA-256, config hash,
//! world size) before reading anything from it, then restore weights, optimizer and progress.
//!
//! A checkpoint written by another number of ranks (or strategy) resumes: weights and optimizer
//! state are stored whole (DDP, ZeRO) or by rows that any world size reads back (FSDP, hybrid),
//! and the data loader states of all old ranks are resharded ([`bellows_data::reshard`]) so that
//! the rest of the epoch is neither repeated nor skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::AutodiffBackend, TensorData};

use bellows_data::{LoaderSpec, LoaderState, Split};
use bellows_models::CausalLm;

use super::manifest::{
    checkpoint_config_hash, config_diff, hashed_config, sha256_hex, Manifest, FORMAT_VERSION,
};
use super::params::{apply_optim, apply_params, param_paths, AdamWOptim, Selection};
use super::rotate::{checkpoints_dir, latest_checkpoint};
use super::save::{loader_file, CheckpointCtx, TrainProgress};
use super::sharded::{ShardedReader, TensorReader};
use super::tensors::read_all;
use crate::config::{Resume, RunConfig};
use crate::{Error, Result};
use bellows_dist::Strategy;

/// The checkpoint `checkpoint.resume` points at: `None` for `"none"`, and for `"latest"` when no
/// complete checkpoint exists yet (a fresh start).
///
/// # Errors
/// An explicit path has no `manifest.json`, or the checkpoints folder cannot be listed.
pub fn resolve_resume(cfg: &RunConfig) -> Result<Option<PathBuf>> {
    match &cfg.checkpoint.resume {
        Resume::None => Ok(None),
        Resume::Latest => latest_checkpoint(&checkpoints_dir(&cfg.run.output_dir)),
        Resume::Path(p) => {
            if p.join(super::manifest::MANIFEST).is_file() {
                Ok(Some(p.clone()))
            } else {
                Err(Error::CheckpointMismatch {
                    dir: p.clone(),
                    message: "checkpoint.resume points at a folder without manifest.json (not a complete checkpoint)".into(),
                })
            }
        }
    }
}

/// Reads `<dir>/manifest.json` and checks it against this job and the files on disk.
///
/// A different world size is accepted when the checkpoint's job and this one both use `ddp`,
/// `zero1`, `zero2` or `fsdp` (their checkpoints hold whole tensors, or rows any world size reads;
/// [`load_checkpoint`] reshards the data loader).
///
/// # Errors
/// A different format or config (naming the keys that differ), a missing, truncated or altered
/// file (naming it), or a different world size under a strategy that cannot be resharded (naming
/// both sizes and the strategies).
pub fn verify_checkpoint(dir: &Path, cfg: &RunConfig, world_size: usize) -> Result<Manifest> {
    let m = Manifest::read(dir)?;
    let mismatch = |message: String| Error::CheckpointMismatch {
        dir: dir.to_path_buf(),
        message,
    };
    if m.format_version != FORMAT_VERSION {
        return Err(mismatch(format!(
            "format version {} (written by bellows {}), this bellows reads version {FORMAT_VERSION}",
            m.format_version, m.bellows_version
        )));
    }
    for (rel, entry) in &m.files {
        let path = dir.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| Error::CheckpointCorrupt {
            file: path.clone(),
            message: format!("listed in the manifest but unreadable: {e}"),
        })?;
        if bytes.len() as u64 != entry.bytes {
            return Err(Error::CheckpointCorrupt {
                file: path,
                message: format!(
                    "{} bytes, the manifest says {} (truncated or overwritten)",
                    bytes.len(),
                    entry.bytes
                ),
            });
        }
        let found = sha256_hex(&bytes);
        if found != entry.sha256 {
            return Err(Error::CheckpointCorrupt {
                file: path,
                message: format!(
                    "content hash mismatch: sha256 {found}, the manifest says {}",
                    entry.sha256
                ),
            });
        }
    }
    for f in &m.loader_files {
        if !m.files.contains_key(f) {
            return Err(mismatch(format!(
                "{f} is not listed in the manifest's files"
            )));
        }
    }
    let want = checkpoint_config_hash(cfg);
    if m.config_hash != want {
        let saved = std::fs::read_to_string(dir.join("config.toml")).unwrap_or_default();
        let diff = config_diff(&hashed_config(&saved), &hashed_config(&cfg.to_toml()));
        let what = if diff.is_empty() {
            "config.toml missing from the checkpoint".to_string()
        } else {
            diff.join("; ")
        };
        return Err(mismatch(format!(
            "config hash {} differs from this job's {want}: {what} (keys that may change on resume: {})",
            m.config_hash,
            m.config_hash_excludes.join(", ")
        )));
    }
    // Any strategy's checkpoint resumes on any number of ranks: DDP and ZeRO checkpoints hold
    // whole tensors (ZeRO takes its rows on load), FSDP / hybrid ones rows by global index, read
    // back for the new shards (`TensorReader`); the loader states are resharded.
    if m.world_size != world_size && m.loader_files.len() != m.world_size {
        return Err(mismatch(format!(
            "written by {} ranks but lists {} loader state files",
            m.world_size,
            m.loader_files.len()
        )));
    }
    Ok(m)
}

/// This rank's loader state: its own file when the world size is unchanged, otherwise the states
/// of every old rank resharded onto this job's ranks.
fn loader_state(ctx: CheckpointCtx<'_>, dir: &Path, m: &Manifest) -> Result<LoaderState> {
    let mut states = Vec::with_capacity(m.loader_files.len());
    for name in &m.loader_files {
        let path = dir.join(name);
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let state = serde_json::from_slice(&text).map_err(|e| Error::CheckpointCorrupt {
            file: path.clone(),
            message: e.to_string(),
        })?;
        states.push(state);
    }
    let spec = LoaderSpec {
        split: Split::Train,
        shard: ctx.acc.shard(),
        seed: ctx.cfg.run.seed,
        vocab_size: ctx.arch.vocab_size,
    };
    bellows_data::reshard(&ctx.cfg.data, spec, &states).map_err(|e| match e {
        bellows_data::Error::Reshard { rank, message } => Error::CheckpointCorrupt {
            file: dir.join(loader_file(rank)),
            message: format!("cannot reshard the data loader: {message}"),
        },
        other => other.into(),
    })
}

/// Restores a verified checkpoint: overwrites the saved weights of `model` (their init does not
/// matter), rebuilds the AdamW state by parameter path under the model's current ids, and returns
/// the progress with this rank's loader state.
///
/// # Errors
/// Verification fails (see [`verify_checkpoint`]), or a tensor is missing or mis-shaped.
pub fn load_checkpoint<B: AutodiffBackend>(
    ctx: CheckpointCtx<'_>,
    dir: &Path,
    model: CausalLm<B>,
    optim: AdamWOptim<CausalLm<B>, B>,
) -> Result<Restored<B>> {
    let m = verify_checkpoint(dir, ctx.cfg, ctx.acc.world_size())?;
    let sel = if ctx.plan.uses_adapters() {
        Selection::Trainable
    } else {
        Selection::All
    };
    if m.weights
        != if sel == Selection::All {
            "full"
        } else {
            "trainable"
        }
    {
        return Err(Error::CheckpointMismatch {
            dir: dir.to_path_buf(),
            message: format!("holds {} weights, this job trains {:?}", m.weights, sel),
        });
    }
    let (wpath, opath) = match &m.shards {
        Some(l) => (dir.join(&l.model_files[0]), dir.join(&l.optimizer_files[0])),
        None => (
            dir.join("model.safetensors"),
            dir.join("optimizer.safetensors"),
        ),
    };
    // FSDP: a sharded weight takes only this rank's rows, whatever world size wrote them.
    let paths = param_paths(&model);
    let rows: HashMap<String, std::ops::Range<usize>> = model
        .sharded_params()
        .into_iter()
        .filter_map(|p| Some((paths.get(&p.id)?.clone(), p.rows)))
        .collect();
    let reader = open_weights(dir, &m)?;
    let mut weights = HashMap::new();
    for name in reader.names() {
        let data = match rows.get(&name) {
            Some(r) => reader.rows(&name, r.clone())?,
            None => reader.whole(&name)?,
        };
        weights.insert(name, data);
    }
    let sharded = model.is_sharded();
    let (model, mut problems) = apply_params(model, sel, &mut weights);
    problems.extend(
        weights
            .keys()
            .map(|k| format!("{k}: not a parameter of this model")),
    );
    check(&wpath, problems)?;
    // ZeRO / FSDP / hybrid jobs keep only their rows of the optimizer state: the recipe hands
    // the opened state to `ZeroAdamW::load_from`, and burn's AdamW gets nothing (it is not used).
    let state = open_optimizer_state(dir, &m)?;
    let rows_only = sharded || ctx.cfg.dist.strategy != Strategy::Ddp;
    let mut moments = if rows_only {
        HashMap::new()
    } else {
        whole_tensors(&*state)?
    };
    let (optim, mut problems) = apply_optim(&model, optim, &mut moments);
    problems.extend(
        moments
            .keys()
            .map(|k| format!("{k}: not a parameter of this model")),
    );
    check(&opath, problems)?;
    let loader = loader_state(ctx, dir, &m)?;
    let resharded_from = (m.world_size != ctx.acc.world_size()).then_some(m.world_size);
    if m.losses.len() as u64 != m.step {
        return Err(Error::CheckpointCorrupt {
            file: dir.join(super::manifest::MANIFEST),
            message: format!("{} losses for {} steps", m.losses.len(), m.step),
        });
    }
    let progress = TrainProgress {
        step: m.step,
        tokens: m.tokens,
        losses: m.losses,
        loader,
        loss_scaler: m.loss_scaler,
        skipped_steps: m.skipped_steps,
    };
    Ok(Restored {
        model,
        optim,
        progress,
        resharded_from,
        optimizer_state: rows_only.then_some(state),
    })
}

/// What [`load_checkpoint`] gives back.
pub struct Restored<B: AutodiffBackend> {
    /// The model with the checkpoint's weights.
    pub model: CausalLm<B>,
    /// The optimizer with the checkpoint's state, keyed by the model's current ids.
    pub optim: AdamWOptim<CausalLm<B>, B>,
    /// Step, tokens, loss history and this rank's loader state (resharded if the world size changed).
    pub progress: TrainProgress,
    /// The checkpoint's world size, when it differs from this job's (the run was resharded).
    pub resharded_from: Option<usize>,
    /// The saved optimizer state, opened, for a job whose strategy shards it (ZeRO, FSDP,
    /// hybrid: `ZeroAdamW::load_from` reads this rank's rows); `None` under DDP, whose state is
    /// already in `optim`.
    pub optimizer_state: Option<Box<dyn TensorReader>>,
}

fn check(file: &Path, mut problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    problems.sort();
    Err(Error::CheckpointCorrupt {
        file: file.to_path_buf(),
        message: format!("does not fit the model: {}", problems.join("; ")),
    })
}

/// The saved weights of a verified checkpoint, consolidated or sharded (any world size).
///
/// # Errors
/// A file is unreadable or does not match the manifest's layout.
pub fn open_weights(dir: &Path, m: &Manifest) -> Result<Box<dyn TensorReader>> {
    Ok(match &m.shards {
        Some(l) => Box::new(ShardedReader::open(dir, &l.model_files, l)?),
        None => Box::new(read_all(&dir.join("model.safetensors"))?),
    })
}

/// The saved optimizer state of a verified checkpoint, consolidated or sharded (any world size).
///
/// # Errors
/// A file is unreadable or does not match the manifest's layout.
pub fn open_optimizer_state(dir: &Path, m: &Manifest) -> Result<Box<dyn TensorReader>> {
    Ok(match &m.shards {
        Some(l) => Box::new(ShardedReader::open(dir, &l.optimizer_files, l)?),
        None => Box::new(read_all(&dir.join("optimizer.safetensors"))?),
    })
}

/// Every tensor of `src`, whole.
fn whole_tensors(src: &dyn TensorReader) -> Result<HashMap<String, TensorData>> {
    src.names()
        .into_iter()
        .map(|n| src.whole(&n).map(|d| (n, d)))
        .collect()
}
