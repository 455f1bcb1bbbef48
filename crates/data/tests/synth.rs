//! The synthetic quickstart data is deterministic, learnable, and matches the committed files.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

use std::path::PathBuf;

use bellows_data::{synthetic_rows, write_synthetic_parquet, Files, Split, SynthSpec, TokenLoader};
use common::*;

const TRAIN: SynthSpec = SynthSpec {
    rows: 4000,
    seq_len: 64,
    vocab_size: 256,
    seed: 1,
};
const EVAL: SynthSpec = SynthSpec {
    rows: 256,
    seq_len: 64,
    vocab_size: 256,
    seed: 2,
};

fn committed(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs/data")
        .join(name)
}

fn read_all(path: &std::path::Path, seq_len: usize) -> Vec<Vec<u32>> {
    let mut cfg = cfg(path, seq_len, 1);
    cfg.eval = Some(Files::One(path.display().to_string()));
    let mut l = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 256)).unwrap();
    drain(&mut l).iter().flat_map(segments).collect()
}

fn as_u32(rows: Vec<Vec<i32>>) -> Vec<Vec<u32>> {
    rows.into_iter()
        .map(|r| r.into_iter().map(|t| t as u32).collect())
        .collect()
}

#[test]
fn regenerating_gives_identical_rows_and_bytes() {
    let dir = tmp();
    let spec = SynthSpec {
        rows: 300,
        seq_len: 20,
        vocab_size: 50,
        seed: 9,
    };
    write_synthetic_parquet(&p(&dir, "a.parquet"), &spec).unwrap();
    write_synthetic_parquet(&p(&dir, "b.parquet"), &spec).unwrap();
    let a = std::fs::read(p(&dir, "a.parquet")).unwrap();
    assert_eq!(a, std::fs::read(p(&dir, "b.parquet")).unwrap());
    assert_eq!(
        read_all(&p(&dir, "a.parquet"), 20),
        as_u32(synthetic_rows(&spec))
    );
    assert_ne!(
        synthetic_rows(&spec),
        synthetic_rows(&SynthSpec { seed: 10, ..spec })
    );
}

#[test]
fn rows_are_arithmetic_progressions_with_small_steps() {
    let spec = SynthSpec {
        rows: 500,
        seq_len: 30,
        vocab_size: 256,
        seed: 3,
    };
    let mut steps = std::collections::HashSet::new();
    for r in synthetic_rows(&spec) {
        let d = (r[1] - r[0]).rem_euclid(256);
        assert!((1..=bellows_data::SYNTH_MAX_STEP as i32).contains(&d));
        steps.insert(d);
        for w in r.windows(2) {
            assert_eq!((w[1] - w[0]).rem_euclid(256), d);
        }
    }
    assert_eq!(steps.len(), bellows_data::SYNTH_MAX_STEP as usize);
}

#[test]
fn committed_quickstart_files_match_their_specs() {
    for (name, spec) in [
        ("quickstart-train.parquet", TRAIN),
        ("quickstart-eval.parquet", EVAL),
    ] {
        let path = committed(name);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 1 << 20, "{name} is {size} bytes");
        assert_eq!(
            read_all(&path, 64),
            as_u32(synthetic_rows(&spec)),
            "{name}: regenerate with cargo run -p bellows-data --example write_quickstart_data"
        );
    }
}
