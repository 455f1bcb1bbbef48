//! [`TokenLoader`]: a sharded, shuffled, resumable stream of fixed-shape token batches.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::batch::BatchBuf;
use crate::doc::{Doc, DocBuilder};
use crate::plan::{mix_seed, plan_epoch, EpochPlan, TAG_ROW_SHUFFLE};
use crate::source::{ChunkReader, Dataset};
use crate::{
    Batch, Carry, ChunkTail, DataConfig, EpochRemainder, Error, LoaderSpec, LoaderState, OnError,
    Packing, Result, RowRef, Shard, Shuffle, Split, Truncation,
};

/// A document taken from the stream, with where it came from.
type Taken = (RowRef, Doc);

/// Streams [`Batch`]es for one rank.
///
/// **Chunks.** Files are indexed into chunks: Parquet row groups, Arrow IPC record batches, blocks of
/// [`JSONL_BLOCK_ROWS`](crate::JSONL_BLOCK_ROWS) JSONL rows. A chunk is read whole by one rank.
///
/// **Sharding.** Each epoch, chunks are taken in order (natural, or for the train split with
/// `shuffle = "seeded"` a permutation drawn from `seed` and the epoch) and each goes to the rank that
/// so far holds the fewest units (padded rows in pad mode, tokens in pack mode; ties to the lowest
/// rank). Ranks therefore read disjoint rows. Every rank computes the same plan, and yields exactly
/// `min over ranks of floor(units / units per batch)` batches in the epoch ([`TokenLoader::steps_in_epoch`]);
/// the rest of its share is **dropped**, never wrapped. A chunk must be small next to a rank's share
/// for little to be dropped: write row groups of a few thousand rows, not one per file.
///
/// **Shuffling.** Besides the chunk order, rows of the train split pass through a shuffle buffer of
/// `shuffle_buffer` documents: it fills to capacity, emits a slot drawn uniformly from a ChaCha8
/// stream seeded by (`seed`, epoch, rank), and refills from the input. The whole stream is a pure
/// function of the files, the config, the seed and the shard. The eval split is read in order.
///
/// **Resharding.** [`reshard`](crate::reshard) turns the states of all ranks into the state of a rank
/// of another world size: the rest of the current epoch is redistributed, later epochs are planned
/// for the new world size.
///
/// **Rows.** Each document is checked (token ids in `0..vocab_size`, lengths), gets its EOS if
/// `add_eos`, is truncated per [`Truncation`], then padded or packed per [`Packing`]. In pack mode
/// (and pad mode with `truncation = "split"`) a partly written document carries over to the next row
/// and batch, but not into the next epoch.
///
/// **Cost.** Opening reads Parquet/IPC metadata (and scans JSONL files once for line starts), unless a
/// chunk's unit count needs its rows (pack mode, `truncation = "split"`, `on_error = "skip"`, text
/// content): then one pass over the split counts them, and [`TokenLoader::resume`] pays it again.
/// Memory is bounded by the shuffle buffer plus the open chunk's decoded rows: 1024 at a time for
/// Parquet, one whole record batch for Arrow IPC, one line for JSONL. See `BENCHMARKS.md`.
///
/// ```no_run
/// use bellows_data::{DataConfig, Files, LoaderSpec, Shard, Split, TokenLoader};
/// let cfg = DataConfig::new(Files::One("configs/data/quickstart-train.parquet".into()));
/// let spec = LoaderSpec { split: Split::Train, shard: Shard::single(), seed: 0, vocab_size: 256 };
/// let mut loader = TokenLoader::new(&cfg, spec)?;
/// let batch = loader.next_batch()?.expect("train data is not empty");
/// assert_eq!(batch.input_ids.len(), cfg.batch_size * cfg.seq_len);
/// # Ok::<(), bellows_data::Error>(())
/// ```
pub struct TokenLoader {
    pub(crate) ds: Dataset,
    pub(crate) builder: DocBuilder,
    pub(crate) spec: LoaderSpec,
    seq_len: usize,
    batch_size: usize,
    packing: Packing,
    on_error: OnError,
    pad: u32,
    buffer_cap: usize,
    pub(crate) shuffled: Option<u64>,
    /// Units per chunk (padded rows or tokens, see [`crate::units`]).
    pub(crate) units: Vec<u64>,
    pub(crate) units_per_batch: u64,
    pub(crate) empty: bool,
    // The current epoch's plan: what this rank reads and how many batches every rank yields.
    epoch: u64,
    chunks: Vec<ChunkTail>,
    steps: u64,
    /// Set when the epoch's plan came from a reshard (saved in the state as is).
    remainder: Option<EpochRemainder>,
    // Position.
    batches_in_epoch: u64,
    chunk_pos: usize,
    row_in_chunk: u64,
    reader: Option<ChunkReader>,
    rng: ChaCha8Rng,
    buffer: Vec<Taken>,
    carry: Option<(RowRef, Doc, usize)>,
    pending: VecDeque<(RowRef, Doc, usize)>,
    finished: bool,
}

impl TokenLoader {
    /// Opens the split's files, indexes them and plans epoch 0.
    ///
    /// Opening reads only metadata, except when a chunk's size in units cannot be known without
    /// reading it (pack mode, `truncation = "split"`, `on_error = "skip"`, or text content): then one
    /// pass over the split counts them, which also reports bad rows early.
    ///
    /// # Errors
    /// An invalid config or shard, unreadable/empty/corrupt files, bad rows found while counting,
    /// [`Error::NotEnoughData`] when some rank cannot get one full batch.
    pub fn new(cfg: &DataConfig, spec: LoaderSpec) -> Result<Self> {
        let mut loader = Self::open(cfg, spec)?;
        if !loader.empty {
            loader.start_epoch(0)?;
        }
        Ok(loader)
    }

    /// Rebuilds the loader at `state` (taken from [`Batch::state_after`] or [`TokenLoader::state`]).
    ///
    /// Seeks straight to the saved chunk and row. Rows still waiting in the shuffle buffer and a
    /// partly emitted document are read again (by seeking to them; a gap of up to 64 rows between two of
    /// them in one chunk is read through rather than seeked over); consumed chunks are never re-read. The batches that follow are identical to those the
    /// original loader would have produced.
    ///
    /// # Errors
    /// As [`TokenLoader::new`], plus [`Error::BadState`] if the state belongs to another split, shard or
    /// data layout.
    pub fn resume(cfg: &DataConfig, spec: LoaderSpec, state: &LoaderState) -> Result<Self> {
        let mut l = Self::open(cfg, spec)?;
        if state.split != spec.split || state.shard != spec.shard {
            return Err(Error::BadState(format!(
                "state is for {:?} rank {} of {}, loader is {:?} rank {} of {}",
                state.split,
                state.shard.rank,
                state.shard.world,
                spec.split,
                spec.shard.rank,
                spec.shard.world
            )));
        }
        if state.num_chunks != l.ds.chunks.len() {
            return Err(Error::BadState(format!(
                "state was taken over {} chunks, the files now have {}",
                state.num_chunks,
                l.ds.chunks.len()
            )));
        }
        if l.empty {
            return Ok(l);
        }
        l.restore(state)?;
        Ok(l)
    }

    /// Moves a freshly opened loader to `state` (already checked to be for this split and shard).
    fn restore(&mut self, state: &LoaderState) -> Result<()> {
        let bad = |what: &str| Error::BadState(format!("{what} is out of range for this data"));
        if state.remainder.is_none() && !state.pending.is_empty() {
            return Err(Error::BadState(
                "pending documents belong to a resharded epoch, and the state has none".into(),
            ));
        }
        match &state.remainder {
            None => self.start_epoch(state.epoch)?,
            Some(_) if self.spec.split == Split::Eval => {
                return Err(Error::BadState(
                    "an eval state cannot hold a resharded epoch".into(),
                ))
            }
            Some(rem) => self.start_remainder(state.epoch, rem)?,
        }
        // The eval split reads its whole share, so it may go past the train step count.
        let step_limit = if self.spec.split == Split::Eval {
            u64::MAX
        } else {
            self.steps
        };
        if state.chunk_pos > self.chunks.len() || state.batches_in_epoch > step_limit {
            return Err(bad("chunk position or batch count"));
        }
        self.batches_in_epoch = state.batches_in_epoch;
        self.chunk_pos = state.chunk_pos;
        self.row_in_chunk = state.row_in_chunk;
        self.rng.set_word_pos(u128::from(state.rng_word_pos));
        self.finished = state.finished;
        let mut wanted: Vec<RowRef> = state.buffer.clone();
        let partial: Vec<Carry> = state.carry.iter().chain(&state.pending).copied().collect();
        wanted.extend(partial.iter().map(|c| c.row));
        if wanted.iter().any(|r| r.chunk >= self.ds.chunks.len()) {
            return Err(bad("a buffered row"));
        }
        let mut docs = self.fetch_rows(&wanted)?;
        let partial_docs = docs.split_off(state.buffer.len().min(docs.len()));
        if partial_docs.len() != partial.len() {
            return Err(bad("a carried document"));
        }
        let mut carried = VecDeque::with_capacity(partial.len());
        for (c, doc) in partial.into_iter().zip(partial_docs) {
            // A damaged state may claim more of the document than it has (found by the
            // `loader_state` fuzz target: this used to panic slicing the document).
            if c.offset > doc.tokens.len() {
                return Err(Error::BadState(format!(
                    "the carried document (chunk {}, row {}) has {} tokens, the state says {} were emitted",
                    c.row.chunk,
                    c.row.row,
                    doc.tokens.len(),
                    c.offset
                )));
            }
            carried.push_back((c.row, doc, c.offset));
        }
        if state.carry.is_some() {
            self.carry = carried.pop_front();
        }
        self.pending = carried;
        self.buffer = state.buffer.iter().copied().zip(docs).collect();
        Ok(())
    }

    /// The next batch, or `None`: never for the train split (epochs repeat, reshuffled from
    /// `seed + epoch`) unless the data is empty; after one pass for the eval split.
    ///
    /// # Errors
    /// I/O and decoding errors, bad rows (with `on_error = "fail"`), data that changed since opening.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.empty || self.finished {
            return Ok(None);
        }
        if self.spec.split == Split::Eval {
            return self.next_eval_batch();
        }
        if self.batches_in_epoch >= self.steps {
            self.start_epoch(self.epoch + 1)?;
        }
        let mut buf = BatchBuf::new(self.batch_size, self.seq_len);
        for row in 1..=self.batch_size {
            match self.packing {
                Packing::Pad => self.fill_pad_row(&mut buf)?,
                Packing::Pack => self.fill_pack_row(&mut buf)?,
            }
            buf.pad_to_rows(row, self.pad);
        }
        self.batches_in_epoch += 1;
        Ok(Some(buf.finish(self.batch_size, self.state())))
    }

    /// The eval split reads this rank's whole share, once: no remainder is dropped, and the last
    /// batch may have fewer rows (so an evaluation counts every token). Ranks may therefore yield
    /// different numbers of eval batches; evaluation needs no per-step synchronisation.
    fn next_eval_batch(&mut self) -> Result<Option<Batch>> {
        let mut buf = BatchBuf::new(self.batch_size, self.seq_len);
        let mut rows = 0;
        for row in 1..=self.batch_size {
            if !self.has_more()? {
                break;
            }
            match self.packing {
                Packing::Pad => self.fill_pad_row(&mut buf)?,
                Packing::Pack => {
                    let mut fill = 0;
                    let mut segment = 0;
                    while fill < self.seq_len && self.has_more()? {
                        let (tokens, labels) = self.take(self.seq_len - fill)?;
                        if tokens.is_empty() {
                            continue;
                        }
                        segment += 1;
                        buf.push_piece(&tokens, &labels, segment, fill > 0);
                        fill += tokens.len();
                    }
                }
            }
            buf.pad_to_rows(row, self.pad);
            rows = row;
        }
        if rows == 0 {
            self.finished = true;
            return Ok(None);
        }
        self.batches_in_epoch += 1;
        Ok(Some(buf.finish(rows, self.state())))
    }

    /// Whether another document is available (fetching it into the carry slot if needed).
    fn has_more(&mut self) -> Result<bool> {
        if self.carry.is_some() {
            return Ok(true);
        }
        match self.next_doc()? {
            Some((r, d)) => {
                self.carry = Some((r, d, 0));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The current state; resuming from it continues right after the last batch returned.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            split: self.spec.split,
            shard: self.spec.shard,
            num_chunks: self.ds.chunks.len(),
            epoch: self.epoch,
            batches_in_epoch: self.batches_in_epoch,
            chunk_pos: self.chunk_pos,
            row_in_chunk: self.row_in_chunk,
            rng_word_pos: u64::try_from(self.rng.get_word_pos()).unwrap_or(u64::MAX),
            buffer: self.buffer.iter().map(|(r, _)| *r).collect(),
            carry: self.carry.as_ref().map(|(r, _, o)| Carry {
                row: *r,
                offset: *o,
            }),
            finished: self.finished,
            pending: self
                .pending
                .iter()
                .map(|(r, _, o)| Carry {
                    row: *r,
                    offset: *o,
                })
                .collect(),
            remainder: self.remainder.clone(),
        }
    }

    /// Batches every rank yields in the current epoch (counted from the epoch's start, also after
    /// a reshard).
    pub fn steps_in_epoch(&self) -> u64 {
        self.steps
    }

    /// Opens and indexes the split's files without planning an epoch.
    pub(crate) fn open(cfg: &DataConfig, spec: LoaderSpec) -> Result<Self> {
        cfg.validated()?;
        let mut issues = Vec::new();
        if spec.shard.world == 0 || spec.shard.rank >= spec.shard.world {
            issues.push((
                "shard".to_string(),
                format!(
                    "rank {} is not below world {}",
                    spec.shard.rank, spec.shard.world
                ),
            ));
        }
        if spec.vocab_size == 0 {
            issues.push(("vocab_size".to_string(), "must be >= 1, got 0".to_string()));
        }
        let files = match (spec.split, &cfg.eval) {
            (Split::Train, _) => &cfg.train,
            (Split::Eval, Some(f)) => f,
            (Split::Eval, None) => {
                issues.push(("data.eval".into(), "no eval files configured".into()));
                &cfg.train
            }
        };
        if !issues.is_empty() {
            return Err(Error::Config(issues));
        }
        let builder = DocBuilder::new(cfg, spec.vocab_size)?;
        let ds = Dataset::open(files, cfg.content, &cfg.columns)?;
        let shuffled = match (spec.split, cfg.shuffle) {
            (Split::Train, Shuffle::Seeded) => Some(spec.seed),
            _ => None,
        };
        let units_per_batch = match cfg.packing {
            Packing::Pad => cfg.batch_size as u64,
            Packing::Pack => (cfg.batch_size * cfg.seq_len) as u64,
        };
        let units = crate::units::count(&ds, &builder, cfg)?;
        let empty = units.iter().all(|&u| u == 0);
        Ok(TokenLoader {
            builder,
            spec,
            seq_len: cfg.seq_len,
            batch_size: cfg.batch_size,
            packing: cfg.packing,
            on_error: cfg.on_error,
            pad: cfg.pad_token_id,
            buffer_cap: if shuffled.is_some() {
                cfg.shuffle_buffer
            } else {
                0
            },
            shuffled,
            units,
            units_per_batch,
            empty,
            epoch: 0,
            chunks: Vec::new(),
            steps: 0,
            remainder: None,
            batches_in_epoch: 0,
            chunk_pos: 0,
            row_in_chunk: 0,
            reader: None,
            rng: ChaCha8Rng::seed_from_u64(0),
            buffer: Vec::new(),
            carry: None,
            pending: VecDeque::new(),
            finished: false,
            ds,
        })
    }

    /// Plans `epoch` for this rank.
    ///
    /// # Errors
    /// [`Error::NotEnoughData`] when, on the train split, some rank cannot get one full batch.
    pub(crate) fn plan(&self, epoch: u64) -> Result<EpochPlan> {
        let Shard { rank, world } = self.spec.shard;
        let plan = plan_epoch(
            &self.units,
            self.units_per_batch,
            self.shuffled,
            epoch,
            rank,
            world,
        );
        // The eval split reads whatever its share holds, down to a single partial batch.
        if plan.steps == 0 && self.spec.split == Split::Train {
            let unit = match self.packing {
                Packing::Pad => "rows",
                Packing::Pack => "tokens",
            };
            return Err(Error::NotEnoughData {
                split: self.spec.split.name(),
                detail: format!(
                    "in epoch {epoch} the smallest of {world} rank shares holds {} {unit}, one batch needs {}; \
                     the {} chunks (row groups / record batches) are given whole to ranks, so use more data, \
                     a smaller batch, or files with smaller row groups",
                    plan.min_units,
                    self.units_per_batch,
                    self.units.len()
                ),
            });
        }
        Ok(plan)
    }

    fn start_epoch(&mut self, epoch: u64) -> Result<()> {
        let plan = self.plan(epoch)?;
        let rank = self.spec.shard.rank;
        let chunks = plan
            .chunks
            .iter()
            .map(|&chunk| ChunkTail { chunk, start: 0 })
            .collect();
        let seed = self.shuffled.unwrap_or(0);
        let rng_seed = mix_seed(&[seed, epoch, rank as u64, TAG_ROW_SHUFFLE]);
        self.begin(epoch, chunks, plan.steps, rng_seed);
        self.remainder = None;
        Ok(())
    }

    /// Starts the rest of `epoch` as a reshard left it (see [`crate::reshard`]).
    fn start_remainder(&mut self, epoch: u64, rem: &EpochRemainder) -> Result<()> {
        let fits = |t: &&ChunkTail| {
            self.ds
                .chunks
                .get(t.chunk)
                .is_some_and(|c| t.start <= c.rows)
        };
        if let Some(t) = rem.chunks.iter().find(|t| !fits(t)) {
            let (row, chunk) = (t.start, t.chunk);
            return Err(Error::BadState(format!(
                "the resharded epoch names row {row} of chunk {chunk}, which the data does not have"
            )));
        }
        self.begin(epoch, rem.chunks.clone(), rem.steps, rem.rng_seed);
        self.remainder = Some(rem.clone());
        Ok(())
    }

    /// Sets the epoch's plan and puts the cursor at its start.
    fn begin(&mut self, epoch: u64, chunks: Vec<ChunkTail>, steps: u64, rng_seed: u64) {
        self.epoch = epoch;
        self.row_in_chunk = chunks.first().map_or(0, |t| t.start);
        self.chunks = chunks;
        self.steps = steps;
        self.batches_in_epoch = 0;
        self.chunk_pos = 0;
        self.reader = None;
        self.buffer.clear();
        self.carry = None;
        self.pending.clear();
        self.rng = ChaCha8Rng::seed_from_u64(rng_seed);
    }

    /// One padded row: the next document (or the next `seq_len` piece of a split one).
    fn fill_pad_row(&mut self, buf: &mut BatchBuf) -> Result<()> {
        let (tokens, labels) = self.take(self.seq_len)?;
        buf.push_piece(&tokens, &labels, 1, false);
        Ok(())
    }

    /// One packed row: documents concatenated until exactly `seq_len` tokens.
    fn fill_pack_row(&mut self, buf: &mut BatchBuf) -> Result<()> {
        let mut fill = 0;
        let mut segment = 0;
        while fill < self.seq_len {
            let (tokens, labels) = self.take(self.seq_len - fill)?;
            if tokens.is_empty() {
                continue;
            }
            segment += 1;
            buf.push_piece(&tokens, &labels, segment, fill > 0);
            fill += tokens.len();
        }
        Ok(())
    }

    /// Up to `max` tokens of the current document, fetching the next one when none is in progress.
    fn take(&mut self, max: usize) -> Result<(Vec<u32>, Vec<i64>)> {
        if self.carry.is_none() {
            self.carry = self.pending.pop_front();
        }
        if self.carry.is_none() {
            let (r, d) = self.next_doc()?.ok_or_else(|| {
                Error::BadState(
                    "ran out of rows before the planned step count; did the files change?".into(),
                )
            })?;
            self.carry = Some((r, d, 0));
        }
        let (_, doc, off) = self.carry.as_mut().expect("carry was just filled");
        let start = *off;
        let end = (start + max).min(doc.tokens.len());
        let piece = (
            doc.tokens[start..end].to_vec(),
            doc.labels[start..end].to_vec(),
        );
        *off = end;
        if end >= doc.tokens.len() {
            self.carry = None;
        }
        Ok(piece)
    }

    /// The next document after the shuffle buffer.
    fn next_doc(&mut self) -> Result<Option<Taken>> {
        // A resharded buffer may be larger than the capacity (it drains down to it) or, on a
        // damaged state, present without one.
        if self.buffer_cap == 0 && self.buffer.is_empty() {
            return self.read_doc();
        }
        while self.buffer.len() < self.buffer_cap {
            match self.read_doc()? {
                Some(t) => self.buffer.push(t),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let j = self.rng.random_range(0..self.buffer.len());
        Ok(Some(self.buffer.swap_remove(j)))
    }

    /// The next good document of this rank's chunks, in file order.
    fn read_doc(&mut self) -> Result<Option<Taken>> {
        loop {
            let Some(&ChunkTail { chunk, .. }) = self.chunks.get(self.chunk_pos) else {
                return Ok(None);
            };
            if self.reader.is_none() {
                self.reader = Some(self.ds.open_chunk(chunk, self.row_in_chunk)?);
            }
            let reader = self.reader.as_mut().expect("reader was just opened");
            let Some(row) = reader.next_row()? else {
                self.chunk_pos += 1;
                self.row_in_chunk = self.chunks.get(self.chunk_pos).map_or(0, |t| t.start);
                self.reader = None;
                continue;
            };
            let rr = RowRef {
                chunk,
                row: self.row_in_chunk,
            };
            self.row_in_chunk += 1;
            match row.and_then(|raw| self.builder.build(raw, self.ds.path(chunk))) {
                Ok(doc) => return Ok(Some((rr, doc))),
                Err(e) if self.on_error == OnError::Skip && e.is_row_level() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Re-reads the documents at `refs` (returned in the same order).
    ///
    /// Rows are read in runs: a new seek starts whenever the next wanted row is in another chunk or
    /// more than [`RESUME_GAP_ROWS`] rows further on, so little consumed data is read again.
    pub(crate) fn fetch_rows(&self, refs: &[RowRef]) -> Result<Vec<Doc>> {
        let mut sorted: Vec<(RowRef, usize)> = refs.iter().copied().zip(0..).collect();
        sorted.sort();
        let mut out: Vec<Option<Doc>> = vec![None; refs.len()];
        let mut open: Option<(usize, u64, ChunkReader)> = None;
        for (want, slot) in sorted {
            let reuse = matches!(&open, Some((c, next, _))
                if *c == want.chunk && *next <= want.row && want.row - *next <= RESUME_GAP_ROWS);
            if !reuse {
                open = Some((
                    want.chunk,
                    want.row,
                    self.ds.open_chunk(want.chunk, want.row)?,
                ));
            }
            let (chunk, next, reader) = open.as_mut().expect("a reader was just opened");
            loop {
                let Some(raw) = reader.next_row()? else {
                    return Err(Error::BadState(format!(
                        "row {} of chunk {chunk} no longer exists",
                        want.row
                    )));
                };
                *next += 1;
                if *next - 1 == want.row {
                    let doc = raw.and_then(|r| self.builder.build(r, self.ds.path(want.chunk)))?;
                    out[slot] = Some(doc);
                    break;
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// Largest run of already-consumed rows [`TokenLoader::resume`] reads through instead of seeking.
const RESUME_GAP_ROWS: u64 = 64;

/// Exposed for [`crate::units`]: whether a chunk's unit count is its row count.
pub(crate) fn rows_are_units(cfg: &DataConfig) -> bool {
    cfg.packing == Packing::Pad
        && cfg.truncation != Truncation::Split
        && cfg.on_error == OnError::Fail
        && cfg.content == crate::Content::Tokens
}
