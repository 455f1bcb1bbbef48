//! Streaming, sharded, shuffled and exactly resumable token batches for bellows.
//!
//! `bellows-data` turns Parquet, Arrow IPC (file and stream, including Hugging Face `save_to_disk`
//! folders) and JSONL files, pre-tokenized or text tokenized on the fly, into fixed-shape causal-LM
//! micro-batches ([`Batch`]) for one rank of a data-parallel job. It depends on no other bellows crate
//! (it takes a plain [`Shard`] rather than importing `dist`) and not on burn: batches are plain vectors.
//!
//! Key behaviour, each documented at its item:
//! - sharding by chunk (Parquet row group, IPC record batch, JSONL block of
//!   [`JSONL_BLOCK_ROWS`] rows), disjoint across ranks, with every rank yielding the same number of
//!   batches per epoch (the remainder is dropped), see [`TokenLoader`];
//! - seeded shuffling of chunk order per epoch plus a row shuffle buffer;
//! - padding or packing ([`Packing`]) with positions and segment ids, and labels in the Hugging Face
//!   convention (unshifted, -100 ignored);
//! - exact resume from a small [`LoaderState`], and [`reshard`] to resume on another number of ranks;
//! - a background [`Prefetcher`].
//!
//! ```
//! use bellows_data::*;
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("train.parquet");
//! write_synthetic_parquet(&path, &SynthSpec { rows: 256, seq_len: 32, vocab_size: 64, seed: 1 })?;
//! let mut cfg = DataConfig::new(Files::One(path.display().to_string()));
//! cfg.seq_len = 32;
//! let spec = LoaderSpec { split: Split::Train, shard: Shard::single(), seed: 7, vocab_size: 64 };
//! let mut loader = TokenLoader::new(&cfg, spec)?;
//! let first = loader.next_batch()?.expect("not empty");
//! let second = loader.next_batch()?.expect("train never ends");
//! let mut resumed = TokenLoader::resume(&cfg, spec, &first.state_after)?;
//! assert_eq!(resumed.next_batch()?, Some(second));
//! # Ok::<(), bellows_data::Error>(())
//! ```
#![warn(missing_docs)]

mod batch;
mod config;
mod doc;
mod error;
mod files;
mod loader;
mod plan;
mod prefetch;
mod reshard;
mod rows;
mod source;
mod state;
mod synth;
mod text;
mod units;

pub use batch::Batch;
pub use config::{
    Columns, Content, DataConfig, Files, OnError, Packing, Shuffle, TokenRef, Truncation,
};
pub use doc::IGNORE_INDEX;
pub use error::{Error, Result};
pub use loader::TokenLoader;
pub use prefetch::Prefetcher;
pub use reshard::reshard;
pub use source::JSONL_BLOCK_ROWS;
pub use state::{Carry, ChunkTail, EpochRemainder, LoaderSpec, LoaderState, RowRef, Shard, Split};
pub use synth::{
    synthetic_rows, write_synthetic_parquet, SynthSpec, SYNTH_MAX_STEP, SYNTH_ROW_GROUP_ROWS,
};
