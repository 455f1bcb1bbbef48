//! The background prefetcher yields exactly what the loader yields, and forwards errors.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

use arrow::datatypes::DataType;
use bellows_data::{Files, Packing, Prefetcher, Split, TokenLoader, Truncation};
use common::*;

#[test]
fn prefetcher_matches_the_loader_and_ends_like_it() {
    let dir = tmp();
    let path = p(&dir, "a.parquet");
    let rows = token_rows(300, 50, |i| 1 + i % 20);
    write_parquet(
        &path,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int32, false))]),
        32,
    );
    let mut cfg = cfg(&path, 16, 4);
    cfg.eval = Some(Files::One(path.display().to_string()));
    cfg.packing = Packing::Pack;
    cfg.truncation = Truncation::Split;
    for split in [Split::Train, Split::Eval] {
        let s = spec(split, 0, 1, 50);
        let mut plain = TokenLoader::new(&cfg, s).unwrap();
        let mut pre = Prefetcher::new(TokenLoader::new(&cfg, s).unwrap(), 3);
        for _ in 0..200 {
            let want = plain.next_batch().unwrap();
            let got = pre.next_batch().unwrap();
            assert_eq!(got, want);
            if want.is_none() {
                break;
            }
        }
        if split == Split::Eval {
            assert_eq!(pre.next_batch().unwrap(), None);
        }
    }
}

#[test]
fn prefetcher_forwards_the_error_after_the_good_batches_and_drops_cleanly() {
    let dir = tmp();
    let path = p(&dir, "bad.parquet");
    let mut rows = token_rows(40, 50, |_| 4);
    rows[25][0] = 77;
    write_parquet(
        &path,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int32, false))]),
        8,
    );
    let mut cfg = cfg(&path, 4, 5);
    cfg.eval = Some(Files::One(path.display().to_string()));
    let mut pre = Prefetcher::new(
        TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 50)).unwrap(),
        2,
    );
    for _ in 0..5 {
        pre.next_batch().unwrap().unwrap();
    }
    let err = pre.next_batch().unwrap_err().to_string();
    assert!(
        err.contains("bad.parquet") && err.contains("row 25"),
        "{err}"
    );
    assert!(pre.next_batch().is_err());

    // An endless train stream with a full queue: dropping must not hang.
    let pre = Prefetcher::new(
        TokenLoader::new(&cfg, spec(Split::Train, 0, 1, 99)).unwrap(),
        2,
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(pre);
}
