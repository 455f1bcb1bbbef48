//! Pack mode: concatenation, segment ids, restarted positions and masked document starts.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

use arrow::datatypes::DataType;
use bellows_data::{Files, Packing, Split, TokenLoader, Truncation};
use common::*;

#[test]
fn pack_mode_concatenates_documents_and_masks_document_starts() {
    let dir = tmp();
    let path = p(&dir, "docs.parquet");
    let rows = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9, 10]];
    write_parquet(
        &path,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int32, false))]),
        10,
    );
    let mut cfg = cfg(&path, 4, 1);
    cfg.eval = Some(Files::One(path.display().to_string()));
    cfg.packing = Packing::Pack;
    cfg.truncation = Truncation::Split;
    let mut l = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 16)).unwrap();
    let b0 = l.next_batch().unwrap().unwrap();
    assert_eq!(b0.input_ids, [1, 2, 3, 4]);
    assert_eq!(b0.segment_ids, [1, 1, 1, 2]);
    assert_eq!(b0.position_ids, [0, 1, 2, 0]);
    assert_eq!(b0.labels, [1, 2, 3, -100]);
    assert_eq!(b0.label_tokens(), 2);
    let b1 = l.next_batch().unwrap().unwrap();
    // Token 5 continues document [4, 5] at the row start; 6 starts a new document.
    assert_eq!(b1.input_ids, [5, 6, 7, 8]);
    assert_eq!(b1.segment_ids, [1, 2, 2, 2]);
    assert_eq!(b1.position_ids, [0, 0, 1, 2]);
    assert_eq!(b1.labels, [5, -100, 7, 8]);
    assert_eq!(b1.label_tokens(), 2);
    // 10 tokens make two full rows of 4; the eval split keeps the last 2 in a padded row.
    let b2 = l.next_batch().unwrap().unwrap();
    assert_eq!(b2.input_ids[..2], [9, 10]);
    assert_eq!(b2.segment_ids[2..], [0, 0]);
    assert_eq!(b2.labels[2..], [-100, -100]);
    assert!(l.next_batch().unwrap().is_none());
}

#[test]
fn pack_mode_truncate_cuts_long_documents_before_packing() {
    let dir = tmp();
    let path = p(&dir, "long.jsonl");
    write_jsonl(&path, &[vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 10, 11]]);
    let mut cfg = cfg(&path, 4, 2);
    cfg.eval = Some(Files::One(path.display().to_string()));
    cfg.packing = Packing::Pack;
    let mut l = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 16)).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    assert_eq!(b.input_ids, [1, 2, 3, 4, 7, 8, 9, 10]);
    assert_eq!(b.segment_ids, [1, 1, 1, 1, 1, 1, 1, 1]);
    assert!(b.labels.iter().all(|&l| l != -100));
    assert_eq!(b.label_tokens(), 6);
}

#[test]
fn packed_rows_never_pad_and_cover_the_token_stream_in_order() {
    let dir = tmp();
    let path = p(&dir, "many.parquet");
    let rows = token_rows(200, 97, |i| 1 + (i * 13) % 29);
    write_parquet(
        &path,
        &batch(vec![(
            "input_ids",
            list_col(&rows, DataType::UInt32, false),
        )]),
        16,
    );
    let mut cfg = cfg(&path, 32, 4);
    cfg.eval = Some(Files::One(path.display().to_string()));
    cfg.packing = Packing::Pack;
    cfg.truncation = Truncation::Split;
    let mut l = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 97)).unwrap();
    let batches = drain(&mut l);
    let total: usize = rows.iter().map(Vec::len).sum();
    // The eval split keeps the remainder: full rows, then one padded final row.
    assert_eq!(batches.len(), total.div_ceil(32 * 4));
    let stream: Vec<u32> = batches
        .iter()
        .flat_map(|b| b.input_ids.clone())
        .take(total)
        .collect();
    let want: Vec<u32> = rows
        .iter()
        .flatten()
        .map(|&t| t as u32)
        .take(stream.len())
        .collect();
    assert_eq!(stream, want);
    let full = &batches[..batches.len() - 1];
    for b in full {
        assert!(b.segment_ids.iter().all(|&s| s > 0), "full rows never pad");
    }
    for b in &batches {
        for i in 0..b.input_ids.len() {
            if i % 32 != 0 && b.segment_ids[i] != b.segment_ids[i - 1] {
                assert_eq!(b.labels[i], -100);
                assert_eq!(b.position_ids[i], 0);
            }
        }
    }
}
