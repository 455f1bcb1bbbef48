//! Checkpoints and exact resume.
//!
//! Layout of `<output_dir>/checkpoints/checkpoint-<step>/`:
//!
//! | file | contents |
//! | --- | --- |
//! | `model.safetensors` | trainable weights by parameter path: adapters (+ `modules_to_save`) when adapters are used, every parameter otherwise; dtypes kept |
//! | `optimizer.safetensors` | AdamW state by path: `<path>.exp_avg`, `<path>.exp_avg_sq`, `<path>.step` (i64, the bias-correction count) |
//! | `loader-rank-<r>.json` | rank `r`'s data loader state after its last consumed batch (all of them are read on resume) |
//! | `config.toml` | the resolved job |
//! | `adapter/` or `model/` | the PEFT adapter / Hugging Face model, ready to use |
//! | `manifest.json` | version, config hash, world size, step, tokens, loss history, dtypes, size and SHA-256 of every file; written last |
//!
//! Saving writes `.tmp-checkpoint-<step>/`, fsyncs every file and the folder, and renames it; only
//! folders with a manifest count, so a crash mid-save leaves the previous checkpoint as the latest.
//! Resuming verifies every hash and refuses another config (see [`HASH_EXCLUDED`]).
//!
//! Elastic resume: a checkpoint written by another number of ranks resumes when the job that wrote
//! it and this one both use `dist.strategy` `ddp`, `zero1`, `zero2` or `fsdp`: DDP and ZeRO store
//! weights and optimizer state whole (ZeRO gathers its shards on save and takes its own rows on
//! load), FSDP stores rows by global index, which any world size reads back. Every
//! rank reads the loader states of all old ranks and reshards them ([`bellows_data::reshard`]):
//! what was left of the current data epoch is dealt out to the new ranks, so no row of the epoch is
//! repeated or skipped (beyond the usual remainder that does not fill a batch), and later epochs are
//! planned for the new world size. Rank 0 prints `resharded the run from N to M ranks at step S`.
//! The global batch changes with
//! the world size, so such a run continues the loss curve but is not bitwise equal to the original.
//!
//! Exactness: the learning rate is a function of the step, the loader resumes from its saved
//! state (no consumed data is re-read), the AdamW step counts are restored, and the recipe reseeds
//! the backend RNG from `(seed, step, rank)` before every step, so dropout masks are a function of
//! the step too. On CPU a resumed run is bitwise equal to an uninterrupted one.

mod card;
mod export;
mod history;
mod load;
mod manifest;
mod params;
mod rotate;
mod save;
mod sharded;
mod signal;
mod tensors;

pub use card::write_model_card;
pub use export::export_checkpoint;
pub use history::truncate_metrics;
pub use load::{
    load_checkpoint, open_optimizer_state, open_weights, resolve_resume, verify_checkpoint,
    Restored,
};
pub use manifest::{
    checkpoint_config_hash, FileEntry, Manifest, FORMAT_VERSION, HASH_EXCLUDED, MANIFEST,
};
pub use params::AdamWOptim;
pub use rotate::{checkpoints_dir, latest_checkpoint, list_checkpoints};
pub use save::{save_checkpoint, CheckpointCtx, OptimRef, TrainProgress};
pub use sharded::{ShardLayout, ShardedReader, TensorReader};
pub use signal::StopSignal;
