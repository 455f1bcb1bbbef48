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
    /// The shard it belongs to (resuming under another world size is refused).
    pub shard: Shard,
    /// Number of chunks in the split when the state was taken (a guard against changed data).
    pub num_chunks: usize,
    /// Current epoch, from 0.
    pub epoch: u64,
    /// Batches already yielded in this epoch.
    pub batches_in_epoch: u64,
    /// Position in this rank's chunk list for the epoch.
    pub chunk_pos: usize,
    /// Rows already read from the chunk at `chunk_pos`.
    pub row_in_chunk: u64,
    /// Words drawn from the shuffle buffer's ChaCha8 stream this epoch.
    pub rng_word_pos: u64,
    /// Rows waiting in the shuffle buffer, in buffer order.
    pub buffer: Vec<RowRef>,
    /// A document cut at a row boundary (pack mode, or pad mode with `truncation = "split"`).
    pub carry: Option<Carry>,
    /// The eval pass is over.
    pub finished: bool,
}
