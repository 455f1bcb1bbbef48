//! Elastic resume (issue #9): the loader states of N ranks resharded onto M ranks in the middle of
//! an epoch. Across the whole run, every row of the epoch is yielded at most once, and every row
//! that is not yielded is in the small remainder the last world size drops at the epoch's end.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

use arrow::datatypes::DataType;
use bellows_data::{
    reshard, Batch, DataConfig, Files, LoaderState, Packing, Shuffle, Split, TokenLoader,
    Truncation,
};
use common::*;

const VOCAB: usize = 1000;
const SEQ: usize = 16;
const BATCH: usize = 3;
/// Parquet rows in row groups of `PQ_GROUP`, then Arrow IPC rows in record batches of `IPC_BATCH`.
const PQ_ROWS: usize = 119;
const PQ_GROUP: usize = 7;
const IPC_ROWS: usize = 60;
const IPC_BATCH: usize = 5;
const DOCS: usize = PQ_ROWS + IPC_ROWS;

/// Document `d` has 1 to 37 tokens, every one of them `d + 1`, so each piece of it in a batch names it.
fn doc_len(d: usize) -> usize {
    1 + (d * 7919) % 37
}

fn dataset(dir: &tempfile::TempDir) -> Files {
    let rows = |range: std::ops::Range<usize>| -> Vec<Vec<i64>> {
        range.map(|d| vec![d as i64 + 1; doc_len(d)]).collect()
    };
    let pq = rows(0..PQ_ROWS);
    let ipc = rows(PQ_ROWS..DOCS);
    write_parquet(
        &p(dir, "a.parquet"),
        &batch(vec![("input_ids", list_col(&pq, DataType::Int32, false))]),
        PQ_GROUP,
    );
    write_ipc(
        &p(dir, "b.arrow"),
        &batch(vec![("input_ids", list_col(&ipc, DataType::Int64, false))]),
        IPC_BATCH,
        false,
    );
    Files::Many(vec![
        p(dir, "a.parquet").display().to_string(),
        p(dir, "b.arrow").display().to_string(),
    ])
}

/// The document at row `row` of chunk `chunk` (Parquet row groups first, then IPC batches).
fn doc_at(chunk: usize, row: u64) -> usize {
    let groups = PQ_ROWS / PQ_GROUP;
    if chunk < groups {
        chunk * PQ_GROUP + row as usize
    } else {
        PQ_ROWS + (chunk - groups) * IPC_BATCH + row as usize
    }
}

fn chunk_rows(chunk: usize) -> u64 {
    if chunk < PQ_ROWS / PQ_GROUP {
        PQ_GROUP as u64
    } else {
        IPC_BATCH as u64
    }
}

fn num_chunks() -> usize {
    PQ_ROWS / PQ_GROUP + IPC_ROWS / IPC_BATCH
}

struct Mode {
    packing: Packing,
    truncation: Truncation,
    shuffle: Shuffle,
}

impl Mode {
    fn config(&self, files: &Files) -> DataConfig {
        let mut c = DataConfig::new(files.clone());
        c.seq_len = SEQ;
        c.batch_size = BATCH;
        c.packing = self.packing;
        c.truncation = self.truncation;
        c.shuffle = self.shuffle;
        c.shuffle_buffer = 13;
        c
    }

    /// Tokens of document `d` after truncation.
    fn built_len(&self, d: usize) -> usize {
        match self.truncation {
            Truncation::Truncate => doc_len(d).min(SEQ),
            _ => doc_len(d),
        }
    }

    /// Units (padded rows or tokens) of `left` tokens of a document.
    fn units(&self, left: usize) -> u64 {
        match self.packing {
            Packing::Pack => left as u64,
            Packing::Pad => left.div_ceil(SEQ).max(1) as u64,
        }
    }

    fn units_per_batch(&self) -> u64 {
        match self.packing {
            Packing::Pack => (BATCH * SEQ) as u64,
            Packing::Pad => BATCH as u64,
        }
    }

    fn largest_chunk_units(&self) -> u64 {
        (0..num_chunks())
            .map(|c| {
                (0..chunk_rows(c))
                    .map(|r| self.units(self.built_len(doc_at(c, r))))
                    .sum()
            })
            .max()
            .unwrap()
    }
}

/// Adds the tokens of every document piece in `b` to `emitted[doc]`.
fn count_tokens(b: &Batch, emitted: &mut [usize]) {
    for piece in segments(b) {
        let d = piece[0] as usize - 1;
        assert!(
            piece.iter().all(|&t| t as usize == d + 1),
            "mixed piece {piece:?}"
        );
        emitted[d] += piece.len();
    }
}

/// Tokens per document a state has not yielded yet in its epoch (buffer, carry, pending, unread rows).
fn unyielded(mode: &Mode, s: &LoaderState, left: &mut [usize]) {
    for c in s.carry.iter().chain(&s.pending) {
        let d = doc_at(c.row.chunk, c.row.row);
        left[d] += mode.built_len(d) - c.offset;
    }
    for r in &s.buffer {
        let d = doc_at(r.chunk, r.row);
        left[d] += mode.built_len(d);
    }
    let rem = s
        .remainder
        .as_ref()
        .expect("a resharded state lists its chunks");
    for (i, t) in rem.chunks.iter().enumerate().skip(s.chunk_pos) {
        let from = if i == s.chunk_pos {
            s.row_in_chunk
        } else {
            t.start
        };
        for row in from..chunk_rows(t.chunk) {
            let d = doc_at(t.chunk, row);
            left[d] += mode.built_len(d);
        }
    }
}

/// Runs epoch 0 on `worlds[0]` ranks up to batch `cuts[0]`, reshards onto `worlds[1]` ranks, and
/// so on; the last world runs to the end of the epoch, then through epoch 1.
fn run(mode: &Mode, files: &Files, worlds: &[usize], cuts: &[u64]) {
    let cfg = mode.config(files);
    let what = format!(
        "{:?}/{:?}/{:?}, worlds {worlds:?} at {cuts:?}",
        mode.packing, mode.truncation, mode.shuffle
    );
    let mut emitted = vec![0usize; DOCS];
    let mut loaders: Vec<TokenLoader> = (0..worlds[0])
        .map(|r| TokenLoader::new(&cfg, spec(Split::Train, r, worlds[0], VOCAB)).unwrap())
        .collect();
    let mut partial_handed_over = false;
    for (i, &next) in worlds[1..].iter().enumerate() {
        let mut states = Vec::new();
        for l in &mut loaders {
            while l.state().batches_in_epoch < cuts[i] {
                count_tokens(&l.next_batch().unwrap().unwrap(), &mut emitted);
            }
            states.push(l.state());
        }
        let new: Vec<LoaderState> = (0..next)
            .map(|r| reshard(&cfg, spec(Split::Train, r, next, VOCAB), &states).unwrap())
            .collect();
        // Deterministic, and every new rank agrees on where the epoch ends.
        for (r, s) in new.iter().enumerate() {
            let again = reshard(&cfg, spec(Split::Train, r, next, VOCAB), &states).unwrap();
            assert_eq!(&again, s, "{what}: reshard is not deterministic");
            assert_eq!(
                s.remainder.as_ref().unwrap().steps,
                new[0].remainder.as_ref().unwrap().steps
            );
            assert_eq!(s.batches_in_epoch, cuts[i]);
        }
        partial_handed_over |= new.iter().any(|s| !s.pending.is_empty());
        loaders = new
            .iter()
            .enumerate()
            .map(|(r, s)| {
                let json = serde_json::to_string(s).unwrap();
                let s: LoaderState = serde_json::from_str(&json).unwrap();
                TokenLoader::resume(&cfg, spec(Split::Train, r, next, VOCAB), &s).unwrap()
            })
            .collect();
    }
    if mode.packing == Packing::Pack {
        assert!(
            partial_handed_over,
            "{what}: no partly emitted document was handed over"
        );
    }
    let last = *worlds.last().unwrap();
    let mut left = vec![0usize; DOCS];
    let mut epoch1 = Vec::new();
    for (r, l) in loaders.iter_mut().enumerate() {
        let steps = l.steps_in_epoch();
        let mut mine = Vec::new();
        while l.state().batches_in_epoch < steps {
            let b = l.next_batch().unwrap().unwrap();
            count_tokens(&b, &mut emitted);
            mine.push(b);
        }
        unyielded(mode, &l.state(), &mut left);
        // Resuming inside the resharded epoch is exact too.
        if mine.len() > 2 {
            let s = mine[0].state_after.clone();
            let mut again =
                TokenLoader::resume(&cfg, spec(Split::Train, r, last, VOCAB), &s).unwrap();
            assert_eq!(
                take(&mut again, mine.len() - 1),
                mine[1..],
                "{what}: rank {r}"
            );
        }
        epoch1.push(take(l, 4));
    }
    let mut dropped_units = 0;
    for d in 0..DOCS {
        assert_eq!(
            emitted[d] + left[d],
            mode.built_len(d),
            "{what}: document {d}: {} tokens yielded, {} left, it has {}",
            emitted[d],
            left[d],
            mode.built_len(d)
        );
        if left[d] > 0 {
            dropped_units += mode.units(left[d]);
        }
    }
    // The greedy split leaves new ranks at most one piece apart, plus less than a batch each.
    let bound = last as u64 * (mode.units_per_batch() + mode.largest_chunk_units());
    assert!(
        dropped_units <= bound,
        "{what}: {dropped_units} units dropped, bound {bound}"
    );
    // The next epoch is planned for the new world size as if the job had always had it.
    for (r, got) in epoch1.iter().enumerate() {
        let mut fresh = TokenLoader::new(&cfg, spec(Split::Train, r, last, VOCAB)).unwrap();
        let steps = fresh.steps_in_epoch() as usize;
        take(&mut fresh, steps);
        assert_eq!(&take(&mut fresh, 4), got, "{what}: epoch 1 of rank {r}");
    }
}

fn modes() -> Vec<Mode> {
    let mut out = Vec::new();
    for shuffle in [Shuffle::Seeded, Shuffle::Off] {
        for (packing, truncation) in [
            (Packing::Pad, Truncation::Truncate),
            (Packing::Pad, Truncation::Split),
            (Packing::Pack, Truncation::Split),
        ] {
            out.push(Mode {
                packing,
                truncation,
                shuffle,
            });
        }
    }
    out
}

#[test]
fn resharding_mid_epoch_yields_each_row_once_and_drops_only_the_last_remainder() {
    let dir = tmp();
    let files = dataset(&dir);
    for mode in modes() {
        let steps = |world: usize| {
            TokenLoader::new(&mode.config(&files), spec(Split::Train, 0, world, VOCAB))
                .unwrap()
                .steps_in_epoch()
        };
        let (s1, s2, s3) = (steps(1), steps(2), steps(3));
        run(&mode, &files, &[2, 3], &[s2 / 2]);
        run(&mode, &files, &[3, 2], &[s3 / 2 + 1]);
        run(&mode, &files, &[2, 1], &[s2 / 3]);
        run(&mode, &files, &[1, 2], &[s1 / 2]);
        // A resharded epoch resharded again.
        run(&mode, &files, &[2, 3, 2], &[s2 / 4, s2 / 2]);
    }
}

#[test]
fn a_reshard_at_the_end_of_an_epoch_starts_the_next_one() {
    let dir = tmp();
    let files = dataset(&dir);
    let mode = Mode {
        packing: Packing::Pack,
        truncation: Truncation::Split,
        shuffle: Shuffle::Seeded,
    };
    let cfg = mode.config(&files);
    let mut states = Vec::new();
    for r in 0..2 {
        let mut l = TokenLoader::new(&cfg, spec(Split::Train, r, 2, VOCAB)).unwrap();
        let steps = l.steps_in_epoch() as usize;
        states.push(take(&mut l, steps).pop().unwrap().state_after);
    }
    for r in 0..3 {
        let s = reshard(&cfg, spec(Split::Train, r, 3, VOCAB), &states).unwrap();
        let mut l = TokenLoader::resume(&cfg, spec(Split::Train, r, 3, VOCAB), &s).unwrap();
        let mut fresh = TokenLoader::new(&cfg, spec(Split::Train, r, 3, VOCAB)).unwrap();
        let steps = fresh.steps_in_epoch() as usize;
        take(&mut fresh, steps);
        assert_eq!(take(&mut l, 3), take(&mut fresh, 3), "rank {r}");
    }
}

#[test]
fn the_same_world_size_is_a_plain_resume_and_old_states_still_parse() {
    let dir = tmp();
    let cfg = Mode {
        packing: Packing::Pad,
        truncation: Truncation::Truncate,
        shuffle: Shuffle::Seeded,
    }
    .config(&dataset(&dir));
    let states: Vec<LoaderState> = (0..2)
        .map(|r| {
            let mut l = TokenLoader::new(&cfg, spec(Split::Train, r, 2, VOCAB)).unwrap();
            take(&mut l, 3).pop().unwrap().state_after
        })
        .collect();
    for (r, s) in states.iter().enumerate() {
        assert_eq!(
            &reshard(&cfg, spec(Split::Train, r, 2, VOCAB), &states).unwrap(),
            s
        );
        // A planned epoch's state is written as before, so older bellows read it and it reads theirs.
        let json = serde_json::to_value(s).unwrap();
        assert!(
            json.get("remainder").is_none() && json.get("pending").is_none(),
            "{json}"
        );
    }
}

#[test]
fn states_that_do_not_belong_together_are_refused_naming_the_rank() {
    let dir = tmp();
    let cfg = Mode {
        packing: Packing::Pad,
        truncation: Truncation::Truncate,
        shuffle: Shuffle::Seeded,
    }
    .config(&dataset(&dir));
    let mut ls: Vec<TokenLoader> = (0..2)
        .map(|r| TokenLoader::new(&cfg, spec(Split::Train, r, 2, VOCAB)).unwrap())
        .collect();
    let a = take(&mut ls[0], 2).pop().unwrap().state_after;
    let b = take(&mut ls[1], 3).pop().unwrap().state_after;
    let new = spec(Split::Train, 0, 3, VOCAB);
    let err = reshard(&cfg, new, &[a.clone(), b.clone()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("old rank 1") && err.contains("batch 3 of epoch 0, rank 0 at batch 2"),
        "{err}"
    );
    let err = reshard(&cfg, new, &[b, a]).unwrap_err().to_string();
    assert!(
        err.contains("old rank 0") && err.contains("expected rank 0 of 2"),
        "{err}"
    );
    let err = reshard(&cfg, new, &[]).unwrap_err().to_string();
    assert!(err.contains("no loader states"), "{err}");
}

#[test]
fn a_world_size_too_large_for_the_data_fails_at_the_reshard_not_at_the_epoch_end() {
    let dir = tmp();
    let cfg = Mode {
        packing: Packing::Pad,
        truncation: Truncation::Truncate,
        shuffle: Shuffle::Seeded,
    }
    .config(&dataset(&dir));
    let mut l = TokenLoader::new(&cfg, spec(Split::Train, 0, 1, VOCAB)).unwrap();
    let state = take(&mut l, 2).pop().unwrap().state_after;
    // 29 chunks cannot give 40 ranks a batch each.
    let err = reshard(&cfg, spec(Split::Train, 0, 40, VOCAB), &[state])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train data is too small") && err.contains("smallest of 40 rank shares"),
        "{err}"
    );
}
