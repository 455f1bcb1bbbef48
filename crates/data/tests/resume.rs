//! Sharding, seeded shuffling, and exact resume from any batch's `state_after`.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

use std::collections::HashSet;

use arrow::datatypes::DataType;
use bellows_data::{
    Batch, DataConfig, Files, LoaderState, Packing, Shuffle, Split, TokenLoader, Truncation,
};
use common::*;

const VOCAB: usize = 1000;

/// Three Parquet files (row groups of 7, 11 and 5 rows) and one JSONL file; row `i` starts with token `i`.
fn dataset(dir: &tempfile::TempDir) -> Files {
    let rows = |start: usize, n: usize| -> Vec<Vec<i64>> {
        (start..start + n)
            .map(|i| {
                let len = 1 + (i * 7919) % 37;
                (0..len)
                    .map(|j| (if j == 0 { i } else { (i + j * 31) % VOCAB }) as i64)
                    .collect()
            })
            .collect()
    };
    let a = rows(0, 90);
    let b = rows(90, 60);
    let c = rows(150, 41);
    write_parquet(
        &p(dir, "a.parquet"),
        &batch(vec![("input_ids", list_col(&a, DataType::Int32, false))]),
        7,
    );
    write_parquet(
        &p(dir, "b.parquet"),
        &batch(vec![("input_ids", list_col(&b, DataType::Int64, true))]),
        11,
    );
    write_ipc(
        &p(dir, "c.arrow"),
        &batch(vec![("input_ids", list_col(&c, DataType::UInt32, false))]),
        5,
        true,
    );
    write_jsonl(&p(dir, "d.jsonl"), &rows(191, 20));
    Files::Many(vec![
        dir.path().join("*.parquet").display().to_string(),
        p(dir, "c.arrow").display().to_string(),
        p(dir, "d.jsonl").display().to_string(),
    ])
}

fn config(files: Files, packing: Packing, truncation: Truncation) -> DataConfig {
    let mut c = DataConfig::new(files.clone());
    c.eval = Some(files);
    c.seq_len = 16;
    c.batch_size = 3;
    c.packing = packing;
    c.truncation = truncation;
    c.shuffle_buffer = 13;
    c
}

fn check_resume(cfg: &DataConfig, split: Split, rank: usize, world: usize, n: usize) {
    let s = spec(split, rank, world, VOCAB);
    let mut l = TokenLoader::new(cfg, s).unwrap();
    let steps = l.steps_in_epoch() as usize;
    let stream: Vec<Batch> = (0..n).map_while(|_| l.next_batch().unwrap()).collect();
    assert!(stream.len() > 2, "too little data for the test");
    let cuts = [
        0,
        1,
        steps.saturating_sub(1),
        steps,
        steps + 2,
        stream.len() / 2,
        stream.len() - 1,
    ];
    for &k in cuts.iter().filter(|&&k| k < stream.len()) {
        // Round-trip through JSON, as a checkpoint would.
        let json = serde_json::to_string(&stream[k].state_after).unwrap();
        let state: LoaderState = serde_json::from_str(&json).unwrap();
        assert!(json.len() < 2000, "state is {} bytes", json.len());
        let mut r = TokenLoader::resume(cfg, s, &state).unwrap();
        for (j, want) in stream[k + 1..].iter().enumerate() {
            let got = r.next_batch().unwrap();
            assert_eq!(
                got.as_ref(),
                Some(want),
                "cut {k}, batch {} ({cfg:?})",
                k + 1 + j
            );
        }
        if split == Split::Eval && stream.len() < n {
            assert_eq!(r.next_batch().unwrap(), None);
        }
    }
}

#[test]
fn resume_from_any_batch_matches_the_uninterrupted_stream() {
    let dir = tmp();
    let files = dataset(&dir);
    for (packing, truncation) in [
        (Packing::Pad, Truncation::Truncate),
        (Packing::Pad, Truncation::Split),
        (Packing::Pack, Truncation::Split),
        (Packing::Pack, Truncation::Truncate),
    ] {
        let cfg = config(files.clone(), packing, truncation);
        for rank in 0..2 {
            check_resume(&cfg, Split::Train, rank, 2, 60);
        }
        check_resume(&cfg, Split::Eval, 1, 2, 1000);
    }
    let mut no_shuffle = config(files, Packing::Pack, Truncation::Split);
    no_shuffle.shuffle = Shuffle::Off;
    check_resume(&no_shuffle, Split::Train, 0, 1, 70);
}

#[test]
fn ranks_get_disjoint_rows_and_the_same_number_of_batches() {
    let dir = tmp();
    let cfg = config(dataset(&dir), Packing::Pad, Truncation::Truncate);
    for world in [1, 2, 3] {
        for split in [Split::Train, Split::Eval] {
            let mut seen = HashSet::new();
            let mut steps = HashSet::new();
            for rank in 0..world {
                let mut l = TokenLoader::new(&cfg, spec(split, rank, world, VOCAB)).unwrap();
                let n = l.steps_in_epoch() as usize;
                steps.insert(n);
                for b in take(&mut l, n) {
                    for row in b.input_ids.chunks(b.seq_len) {
                        assert!(
                            seen.insert(row[0]),
                            "row {} read twice (world {world})",
                            row[0]
                        );
                    }
                }
                if split == Split::Eval {
                    // The eval split also yields this rank's remainder (partial last batch), then ends;
                    // the rows stay disjoint across ranks.
                    while let Some(b) = l.next_batch().unwrap() {
                        for row in b.input_ids.chunks(b.seq_len) {
                            assert!(seen.insert(row[0]), "remainder row {} read twice", row[0]);
                        }
                    }
                }
            }
            assert_eq!(steps.len(), 1, "world {world}: steps differ: {steps:?}");
            let n = *steps.iter().next().unwrap();
            // Only the remainder is dropped: at most the chunk-size imbalance (chunks hold <= 20 rows)
            // plus a partial batch per rank.
            if split == Split::Eval {
                assert_eq!(
                    seen.len(),
                    211,
                    "the eval split reads every row exactly once"
                );
                continue;
            }
            assert_eq!(seen.len(), n * 3 * world);
            assert!(
                seen.len() + world * (20 + 3) >= 211,
                "{} rows of 211",
                seen.len()
            );
        }
    }
}

#[test]
fn shuffle_is_seeded_and_changes_every_epoch() {
    let dir = tmp();
    let cfg = config(dataset(&dir), Packing::Pad, Truncation::Truncate);
    let first_tokens = |seed: u64, n: usize| -> Vec<Vec<u32>> {
        let mut s = spec(Split::Train, 0, 1, VOCAB);
        s.seed = seed;
        let mut l = TokenLoader::new(&cfg, s).unwrap();
        let steps = l.steps_in_epoch() as usize;
        let bs = take(&mut l, steps * n);
        bs.chunks(steps)
            .map(|e| {
                e.iter()
                    .flat_map(|b| b.input_ids.chunks(16).map(|r| r[0]))
                    .collect()
            })
            .collect()
    };
    let a = first_tokens(1, 2);
    assert_eq!(a, first_tokens(1, 2));
    assert_ne!(a, first_tokens(2, 2));
    assert_ne!(a[0], a[1], "epoch 1 must be reshuffled");
    let mut e0 = a[0].clone();
    let mut e1 = a[1].clone();
    e0.sort();
    e1.sort();
    assert_eq!(e0.len(), 210);
    assert!(e0.windows(2).all(|w| w[0] != w[1]));
    // Not in file order.
    assert_ne!(a[0], e0);
    assert!(e1.windows(2).all(|w| w[0] != w[1]));
}

#[test]
fn resume_refuses_a_state_from_another_shard() {
    let dir = tmp();
    let cfg = config(dataset(&dir), Packing::Pad, Truncation::Truncate);
    let mut l = TokenLoader::new(&cfg, spec(Split::Train, 0, 2, VOCAB)).unwrap();
    let st = l.next_batch().unwrap().unwrap().state_after;
    let err = TokenLoader::resume(&cfg, spec(Split::Train, 1, 2, VOCAB), &st)
        .err()
        .unwrap();
    assert!(err.to_string().contains("cannot resume"), "{err}");
}

#[test]
fn jsonl_blocks_seek_and_resume_across_block_boundaries() {
    let dir = tmp();
    let path = p(&dir, "big.jsonl");
    let n = 2 * bellows_data::JSONL_BLOCK_ROWS as usize + 100;
    let rows: Vec<Vec<i64>> = (0..n).map(|i| vec![(i % VOCAB) as i64, 1, 2]).collect();
    write_jsonl(&path, &rows);
    let mut cfg = cfg(&path, 4, 64);
    cfg.shuffle_buffer = 100;
    let s = spec(Split::Train, 0, 1, VOCAB);
    let mut l = TokenLoader::new(&cfg, s).unwrap();
    assert_eq!(l.steps_in_epoch() as usize, n / 64);
    let stream = take(&mut l, 200);
    for k in [60, 63, 64, 65, 130] {
        let mut r = TokenLoader::resume(&cfg, s, &stream[k].state_after).unwrap();
        assert_eq!(take(&mut r, 20), stream[k + 1..k + 21], "cut {k}");
    }
}

#[test]
fn too_few_chunks_for_the_world_size_is_a_clear_error() {
    let dir = tmp();
    let path = p(&dir, "one-group.parquet");
    let rows = token_rows(100, 50, |_| 5);
    write_parquet(
        &path,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int32, false))]),
        1000,
    );
    let cfg = cfg(&path, 8, 4);
    assert!(TokenLoader::new(&cfg, spec(Split::Train, 0, 1, 50)).is_ok());
    let err = TokenLoader::new(&cfg, spec(Split::Train, 1, 2, 50))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("train data is too small")
            && err.contains("holds 0 rows")
            && err.contains("smaller row groups"),
        "{err}"
    );
}
