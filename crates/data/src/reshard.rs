//! Elastic resume: the loader states of every rank of a job turned into the state of one rank of
//! a job with another world size ([`reshard`]).

use crate::plan::{mix_seed, plan_epoch, TAG_RESHARD_SHUFFLE};
use crate::units::{count_from, doc_units};
use crate::{
    Carry, ChunkTail, DataConfig, EpochRemainder, Error, LoaderSpec, LoaderState, Result, RowRef,
    Shard, Split, TokenLoader,
};

/// The state of rank `spec.shard.rank` of `spec.shard.world` ranks that continues the train run
/// whose ranks saved `states` (one per old rank, in rank order, all at the same batch of the same
/// epoch, as they are at a checkpoint).
///
/// With as many states as `spec.shard.world` this is simply `states[rank]` (a plain resume).
/// Otherwise what the epoch has left is redistributed. For each old rank that is: its partly
/// emitted documents (the carry, and documents still pending from an earlier reshard), the
/// documents waiting in its shuffle buffer, the unread rows of its current chunk, and the chunks it
/// has not opened yet. These pieces are listed in a fixed order — partial documents by old rank,
/// then buffered documents by old rank in buffer order, then the unread chunk tails and chunks taken
/// in turn from each old rank's list — and dealt out largest first (Graham's LPT rule; ties in list
/// order), each to the new rank that so far holds the fewest units (padded rows in pad mode, tokens
/// in pack mode; ties to the lowest rank). Each new rank keeps its own pieces, in list order:
///
/// - partial documents are finished first ([`LoaderState::pending`]);
/// - buffered documents form its shuffle buffer (which drains down to its capacity), drawn from a
///   new stream ([`EpochRemainder::rng_seed`]);
/// - chunk tails and chunks become its reading list ([`EpochRemainder::chunks`]).
///
/// Every new rank then yields `min over new ranks of floor(units / units per batch)` more batches
/// in the epoch. So, across all old and new ranks together, no row of the epoch is yielded twice,
/// and none is lost beyond the remainder that does not fill a batch at the epoch's end (at most one
/// piece plus one batch per new rank). The following epochs are planned normally for the new world
/// size. Every new rank must pass the same `states`; the result is deterministic. Resume a loader
/// from it with [`TokenLoader::resume`].
///
/// Cost: it opens the split as [`TokenLoader::new`] does, and reads every old rank's buffered and
/// partly emitted documents; outside pad mode with plain token rows it also reads the unread tail
/// of each old rank's current chunk to count its units.
///
/// ```
/// use bellows_data::*;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("train.parquet");
/// write_synthetic_parquet(&path, &SynthSpec { rows: 512, seq_len: 16, vocab_size: 64, seed: 1 })?;
/// let mut cfg = DataConfig::new(Files::One(path.display().to_string()));
/// cfg.seq_len = 16;
/// let spec = |rank, world| LoaderSpec { split: Split::Train, shard: Shard { rank, world }, seed: 7, vocab_size: 64 };
/// // Two ranks take one batch each, then the job continues on three ranks.
/// let mut states = Vec::new();
/// for rank in 0..2 {
///     let mut l = TokenLoader::new(&cfg, spec(rank, 2))?;
///     states.push(l.next_batch()?.expect("a batch").state_after);
/// }
/// for rank in 0..3 {
///     let state = reshard(&cfg, spec(rank, 3), &states)?;
///     let mut l = TokenLoader::resume(&cfg, spec(rank, 3), &state)?;
///     assert!(l.next_batch()?.is_some());
/// }
/// # Ok::<(), bellows_data::Error>(())
/// ```
///
/// # Errors
/// [`Error::Reshard`] when a state does not fit the others (rank order, world size, epoch, batch
/// count, split) or the data; the errors of [`TokenLoader::new`] for the new shard, including
/// [`Error::NotEnoughData`] when the next epoch cannot give every new rank a full batch.
pub fn reshard(cfg: &DataConfig, spec: LoaderSpec, states: &[LoaderState]) -> Result<LoaderState> {
    check_states(spec, states)?;
    if states.len() == spec.shard.world {
        return Ok(states[spec.shard.rank].clone());
    }
    let loader = TokenLoader::open(cfg, spec)?;
    resharded(&loader, cfg, states)
}

/// One piece of an epoch's remaining work, and its size in units.
#[derive(Clone, Copy, Debug)]
enum Piece {
    /// A document, partly emitted (`offset > 0`, with its remaining tokens) or waiting whole in a buffer.
    Doc(Carry, u64),
    /// Unread rows of a chunk.
    Rows(ChunkTail, u64),
}

impl Piece {
    fn units(self) -> u64 {
        match self {
            Piece::Doc(_, u) | Piece::Rows(_, u) => u,
        }
    }
}

/// The states must be all the ranks of one job, at the same point of the same train epoch.
fn check_states(spec: LoaderSpec, states: &[LoaderState]) -> Result<()> {
    let Shard { rank, world } = spec.shard;
    if rank >= world {
        return Err(Error::Config(vec![(
            "shard".into(),
            format!("rank {rank} is not below world {world}"),
        )]));
    }
    let Some(first) = states.first() else {
        return Err(Error::BadState("no loader states to reshard".into()));
    };
    if spec.split != Split::Train {
        return Err(Error::BadState(
            "only the train split is resharded (an eval pass starts afresh)".into(),
        ));
    }
    let world = states.len();
    for (rank, s) in states.iter().enumerate() {
        let fail = |message: String| Err(Error::Reshard { rank, message });
        if s.shard != (Shard { rank, world }) {
            return fail(format!(
                "it is the state of rank {} of {}, expected rank {rank} of {world} (one state per old rank, in rank order)",
                s.shard.rank, s.shard.world
            ));
        }
        if s.split != Split::Train || s.finished {
            return fail(format!(
                "it is a {:?} state, expected a train state",
                s.split
            ));
        }
        if (s.epoch, s.batches_in_epoch) != (first.epoch, first.batches_in_epoch) {
            return fail(format!(
                "it stands at batch {} of epoch {}, rank 0 at batch {} of epoch {}",
                s.batches_in_epoch, s.epoch, first.batches_in_epoch, first.epoch
            ));
        }
        let steps = |st: &LoaderState| st.remainder.as_ref().map(|r| r.steps);
        if steps(s) != steps(first) {
            return fail(format!(
                "its epoch ends after {:?} batches, rank 0's after {:?} (None: as planned)",
                steps(s),
                steps(first)
            ));
        }
        if s.num_chunks != first.num_chunks {
            return fail(format!(
                "it was taken over {} chunks, rank 0's over {}",
                s.num_chunks, first.num_chunks
            ));
        }
    }
    Ok(())
}

/// The new state of `loader`'s shard, from checked `states` of another world size.
fn resharded(
    loader: &TokenLoader,
    cfg: &DataConfig,
    states: &[LoaderState],
) -> Result<LoaderState> {
    let Shard { rank, world } = loader.spec.shard;
    let first = &states[0];
    if first.num_chunks != loader.ds.chunks.len() {
        return Err(Error::Reshard {
            rank: 0,
            message: format!(
                "it was taken over {} chunks, the files now have {}",
                first.num_chunks,
                loader.ds.chunks.len()
            ),
        });
    }
    let old_steps = match &first.remainder {
        Some(r) => r.steps,
        None => {
            plan_epoch(
                &loader.units,
                loader.units_per_batch,
                loader.shuffled,
                first.epoch,
                0,
                states.len(),
            )
            .steps
        }
    };
    // Fail now rather than at the end of the epoch if the new world size is too large for the data.
    if !loader.empty {
        loader.plan(first.epoch + 1)?;
    }
    let k = first.batches_in_epoch;
    if k > old_steps {
        return Err(Error::Reshard {
            rank: 0,
            message: format!("it is at batch {k} of an epoch of {old_steps} batches"),
        });
    }
    // An epoch that is over leaves nothing: the next batch starts the next epoch.
    let pieces = if k == old_steps {
        Vec::new()
    } else {
        remaining_pieces(loader, cfg, states)?
    };
    let (owner, held) = assign(&pieces, world);
    let (mut pending, mut buffer, mut chunks) = (Vec::new(), Vec::new(), Vec::new());
    for (piece, _) in pieces.into_iter().zip(owner).filter(|&(_, o)| o == rank) {
        match piece {
            Piece::Doc(c, _) if c.offset > 0 => pending.push(c),
            Piece::Doc(c, _) => buffer.push(c.row),
            Piece::Rows(t, _) => chunks.push(t),
        }
    }
    let more = held.iter().copied().min().unwrap_or(0) / loader.units_per_batch.max(1);
    let seed = loader.shuffled.unwrap_or(0);
    let rng_seed = mix_seed(&[
        seed,
        first.epoch,
        rank as u64,
        world as u64,
        k,
        TAG_RESHARD_SHUFFLE,
    ]);
    Ok(LoaderState {
        split: Split::Train,
        shard: loader.spec.shard,
        num_chunks: first.num_chunks,
        epoch: first.epoch,
        batches_in_epoch: k,
        chunk_pos: 0,
        row_in_chunk: chunks.first().map_or(0, |t| t.start),
        rng_word_pos: 0,
        buffer,
        carry: None,
        finished: false,
        pending,
        remainder: Some(EpochRemainder {
            chunks,
            steps: k.saturating_add(more),
            rng_seed,
        }),
    })
}

/// The new rank of each piece, and the units each new rank holds: largest piece first (ties in
/// list order), each to the rank holding the fewest units so far (ties to the lowest rank).
fn assign(pieces: &[Piece], world: usize) -> (Vec<usize>, Vec<u64>) {
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(pieces[i].units()), i));
    let mut held = vec![0u64; world];
    let mut owner = vec![0; pieces.len()];
    for i in order {
        let (r, _) = held
            .iter()
            .enumerate()
            .min_by_key(|&(r, &u)| (u, r))
            .expect("world >= 1");
        held[r] += pieces[i].units();
        owner[i] = r;
    }
    (owner, held)
}

/// Every old rank's remaining work of the epoch, in list order.
fn remaining_pieces(
    loader: &TokenLoader,
    cfg: &DataConfig,
    states: &[LoaderState],
) -> Result<Vec<Piece>> {
    let partial: Vec<(usize, Carry)> = states
        .iter()
        .enumerate()
        .flat_map(|(r, s)| s.carry.iter().chain(&s.pending).map(move |c| (r, *c)))
        .collect();
    let whole: Vec<(usize, Carry)> = states
        .iter()
        .enumerate()
        .flat_map(|(r, s)| {
            s.buffer
                .iter()
                .map(move |&row| (r, Carry { row, offset: 0 }))
        })
        .collect();
    let mut pieces = Vec::new();
    for (rank, c) in partial.into_iter().chain(whole) {
        if c.row.chunk >= loader.ds.chunks.len() {
            return Err(Error::Reshard {
                rank,
                message: format!(
                    "it holds a row of chunk {}, the data has {} chunks",
                    c.row.chunk,
                    loader.ds.chunks.len()
                ),
            });
        }
        pieces.push((rank, c));
    }
    let refs: Vec<RowRef> = pieces.iter().map(|(_, c)| c.row).collect();
    let docs = loader.fetch_rows(&refs)?;
    let mut out = Vec::with_capacity(pieces.len());
    for ((rank, c), doc) in pieces.into_iter().zip(docs) {
        let left = doc
            .tokens
            .len()
            .checked_sub(c.offset)
            .ok_or_else(|| Error::Reshard {
                rank,
                message: format!(
                    "its document at chunk {} row {} has {} tokens, the state says {} were emitted",
                    c.row.chunk,
                    c.row.row,
                    doc.tokens.len(),
                    c.offset
                ),
            })?;
        out.push(Piece::Doc(c, doc_units(cfg, left)));
    }
    let lists: Vec<Vec<ChunkTail>> = states
        .iter()
        .enumerate()
        .map(|(r, s)| unread_chunks(loader, states.len(), r, s))
        .collect::<Result<_>>()?;
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for t in lists.iter().filter_map(|l| l.get(i)) {
            let units = if t.start == 0 {
                loader.units[t.chunk]
            } else {
                count_from(&loader.ds, &loader.builder, cfg, t.chunk, t.start)?
            };
            out.push(Piece::Rows(*t, units));
        }
    }
    Ok(out)
}

/// Old rank `rank`'s unread rows: the rest of its current chunk, then the chunks after it.
fn unread_chunks(
    loader: &TokenLoader,
    world: usize,
    rank: usize,
    s: &LoaderState,
) -> Result<Vec<ChunkTail>> {
    let list: Vec<ChunkTail> = match &s.remainder {
        Some(r) => r.chunks.clone(),
        None => plan_epoch(
            &loader.units,
            loader.units_per_batch,
            loader.shuffled,
            s.epoch,
            rank,
            world,
        )
        .chunks
        .into_iter()
        .map(|chunk| ChunkTail { chunk, start: 0 })
        .collect(),
    };
    let fail = |message: String| Error::Reshard { rank, message };
    if s.chunk_pos > list.len() {
        return Err(fail(format!(
            "its chunk position {} is past its {} chunks",
            s.chunk_pos,
            list.len()
        )));
    }
    let mut out = Vec::with_capacity(list.len() - s.chunk_pos);
    for (i, t) in list.into_iter().enumerate().skip(s.chunk_pos) {
        let rows = loader
            .ds
            .chunks
            .get(t.chunk)
            .ok_or_else(|| {
                fail(format!(
                    "it names chunk {}, the data has {}",
                    t.chunk,
                    loader.ds.chunks.len()
                ))
            })?
            .rows;
        let start = if i == s.chunk_pos {
            s.row_in_chunk
        } else {
            t.start
        };
        if start > rows {
            return Err(fail(format!(
                "it is at row {start} of chunk {}, which has {rows} rows",
                t.chunk
            )));
        }
        if start < rows {
            out.push(ChunkTail {
                chunk: t.chunk,
                start,
            });
        }
    }
    Ok(out)
}
