//! The small values that describe where a loader is: its spec and its resumable state.

use serde::{Deserialize, Serialize};

/// This process's slice of the data: rank `rank` of `world` ranks. A plain value (no `dist` dependency).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// 0-based rank, `< world`.
    pub rank: usize,
    /// Number of ranks, `>= 1`.
    pub world: usize,
}

impl Shard {
    /// The single-process shard: rank 0 of 1.
    pub fn single() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

/// Which files of the [`DataConfig`](crate::DataConfig) to read and how.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// `train` files: shuffled (unless `shuffle = "off"`), epochs repeat forever.
    Train,
    /// `eval` files: natural order, one pass, then `None`.
    Eval,
}

impl Split {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// Everything besides the config that a loader needs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderSpec {
    /// Train or eval.
    pub split: Split,
    /// This rank's shard.
    pub shard: Shard,
    /// Shuffle seed; epoch `e` uses streams derived from `seed` and `e`.
    pub seed: u64,
    /// Model vocabulary size; every token id and label must be below it.
    pub vocab_size: usize,
}

/// A row of the dataset: chunk id (in the split's chunk index) and row within the chunk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowRef {
    /// Chunk id: row groups / record batches / JSONL blocks numbered across all files in order.
    pub chunk: usize,
    /// 0-based row within the chunk.
    pub row: u64,
}

/// A document partly written into earlier rows: it resumes at token `offset`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carry {
    /// The document's row.
    pub row: RowRef,
    /// Tokens of it already emitted.
    pub offset: usize,
}

/// Where a [`TokenLoader`](crate::TokenLoader) stands, small enough to store in every checkpoint.
///
/// It holds positions and row references, never token data: resuming re-reads only the rows still
/// waiting in the shuffle buffer and the partly emitted document, then seeks to `chunk_pos`/`row_in_chunk`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LoaderState {
    /// The split it belongs to.
    pub split: Split,
    /// The shard it belongs to. [`TokenLoader::resume`](crate::TokenLoader::resume) refuses another
    /// shard; [`reshard`](crate::reshard) turns the states of all ranks into one for another world size.
    pub shard: Shard,
    /// Number of chunks in the split when the state was taken (a guard against changed data).
    pub num_chunks: usize,
    /// Current epoch, from 0.
    pub epoch: u64,
    /// Batches already yielded in this epoch.
    pub batches_in_epoch: u64,
    /// Position in this rank's chunk list for the epoch (the epoch plan's, or `remainder.chunks`).
    pub chunk_pos: usize,
    /// Next row to read of the chunk at `chunk_pos`, counted from the chunk's first row.
    pub row_in_chunk: u64,
    /// Words drawn from the shuffle buffer's ChaCha8 stream this epoch.
    pub rng_word_pos: u64,
    /// Rows waiting in the shuffle buffer, in buffer order.
    pub buffer: Vec<RowRef>,
    /// A document cut at a row boundary (pack mode, or pad mode with `truncation = "split"`).
    pub carry: Option<Carry>,
    /// The eval pass is over.
    pub finished: bool,
    /// Partly emitted documents handed over by a reshard, finished in order after `carry` and before
    /// any other row. Empty unless the state comes from [`reshard`](crate::reshard).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Carry>,
    /// The rest of the current epoch after a reshard, replacing the epoch's planned chunk list and
    /// step count; `None` (and absent from older checkpoints) for a planned epoch. The next epoch is
    /// planned normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remainder: Option<EpochRemainder>,
}

/// Rows `start..` of chunk `chunk`: one entry of a resharded epoch's reading list.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkTail {
    /// Chunk id.
    pub chunk: usize,
    /// First row to read (0 for a whole chunk).
    pub start: u64,
}

/// One rank's share of what was left of an epoch when its job was resharded to another world size.
///
/// Made by [`reshard`](crate::reshard); it replaces the planned chunk list of the current epoch
/// only. Its shuffle buffer stream is seeded by `rng_seed` rather than by (seed, epoch, rank).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EpochRemainder {
    /// What this rank reads for the rest of the epoch, in order (after the buffer and pending documents).
    pub chunks: Vec<ChunkTail>,
    /// The epoch ends when `batches_in_epoch` reaches this value, on every rank.
    pub steps: u64,
    /// Seed of this rank's shuffle buffer stream for the rest of the epoch.
    pub rng_seed: u64,
}
