//! Pre-tokenized sources: formats, column types, optional columns, and errors naming file/column/row.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

use arrow::datatypes::DataType;
use bellows_data::{DataConfig, Error, Files, OnError, Split, TokenLoader, Truncation};
use common::*;

fn eval_cfg(files: Files, seq_len: usize, batch_size: usize) -> DataConfig {
    let mut c = DataConfig::new(files.clone());
    c.eval = Some(files);
    c.seq_len = seq_len;
    c.batch_size = batch_size;
    c
}

fn one(path: &std::path::Path) -> Files {
    Files::One(path.display().to_string())
}

fn eval_docs(cfg: &DataConfig, vocab: usize) -> Vec<Vec<u32>> {
    let mut l = TokenLoader::new(cfg, spec(Split::Eval, 0, 1, vocab)).unwrap();
    drain(&mut l).iter().flat_map(segments).collect()
}

#[test]
fn pad_mode_lays_out_tokens_labels_positions_and_segments() {
    let dir = tmp();
    let path = p(&dir, "a.parquet");
    let rows = vec![vec![5, 6, 7], vec![1, 2, 3, 4, 9]];
    write_parquet(
        &path,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int32, false))]),
        10,
    );
    let cfg = eval_cfg(one(&path), 4, 2);
    let mut l = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 16)).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    assert_eq!(b.input_ids, [5, 6, 7, 0, 1, 2, 3, 4]);
    assert_eq!(b.labels, [5, 6, 7, -100, 1, 2, 3, 4]);
    assert_eq!(b.position_ids, [0, 1, 2, 0, 0, 1, 2, 3]);
    assert_eq!(b.segment_ids, [1, 1, 1, 0, 1, 1, 1, 1]);
    // Row 0 predicts labels[1], labels[2] (2 targets); row 1 predicts 3 (labels[1..4]).
    assert_eq!(b.label_tokens(), 5);
    assert!(l.next_batch().unwrap().is_none());
    assert!(l.next_batch().unwrap().is_none());
}

#[test]
fn every_format_and_list_type_gives_the_same_documents() {
    let dir = tmp();
    let rows = token_rows(37, 50, |i| 1 + i % 9);
    let expected: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| r.iter().map(|&t| t as u32).collect())
        .collect();
    let types = [
        (DataType::Int32, false),
        (DataType::Int64, false),
        (DataType::UInt32, false),
        (DataType::Int32, true),
        (DataType::Int64, true),
    ];
    for (k, (elem, large)) in types.iter().enumerate() {
        let rb = batch(vec![("input_ids", list_col(&rows, elem.clone(), *large))]);
        let pq = p(&dir, &format!("{k}.parquet"));
        write_parquet(&pq, &rb, 5);
        let ipc_file = p(&dir, &format!("{k}.arrow"));
        write_ipc(&ipc_file, &rb, 6, false);
        let ipc_stream = p(&dir, &format!("{k}.stream.arrow"));
        write_ipc(&ipc_stream, &rb, 7, true);
        for path in [&pq, &ipc_file, &ipc_stream] {
            let got = eval_docs(&eval_cfg(one(path), 16, 1), 50);
            assert_eq!(got, expected, "{} ({elem} large={large})", path.display());
        }
    }
    let jl = p(&dir, "rows.jsonl");
    write_jsonl(&jl, &rows);
    assert_eq!(eval_docs(&eval_cfg(one(&jl), 16, 1), 50), expected);
}

#[test]
fn globs_and_lists_of_files_are_read_in_sorted_then_listed_order() {
    let dir = tmp();
    let a = token_rows(3, 99, |_| 2);
    let b: Vec<Vec<i64>> = token_rows(4, 99, |_| 3);
    write_parquet(
        &p(&dir, "part-1.parquet"),
        &batch(vec![("input_ids", list_col(&b, DataType::Int64, false))]),
        2,
    );
    write_parquet(
        &p(&dir, "part-0.parquet"),
        &batch(vec![("input_ids", list_col(&a, DataType::Int64, false))]),
        2,
    );
    write_jsonl(&p(&dir, "extra.jsonl"), &a);
    let files = Files::Many(vec![
        dir.path().join("part-*.parquet").display().to_string(),
        p(&dir, "extra.jsonl").display().to_string(),
    ]);
    let got = eval_docs(&eval_cfg(files, 8, 1), 99);
    let want: Vec<Vec<u32>> = a
        .iter()
        .chain(&b)
        .chain(&a)
        .map(|r| r.iter().map(|&t| t as u32).collect())
        .collect();
    assert_eq!(got, want);

    let none = Files::One(dir.path().join("nope-*.parquet").display().to_string());
    let err = TokenLoader::new(&eval_cfg(none, 8, 1), spec(Split::Eval, 0, 1, 99))
        .err()
        .unwrap();
    assert!(matches!(err, Error::NoMatch { .. }), "{err}");
}

#[test]
fn labels_and_attention_mask_columns_are_used() {
    let dir = tmp();
    let path = p(&dir, "m.parquet");
    let ids = vec![vec![1, 2, 3, 0, 0], vec![4, 5, 6, 7, 8]];
    let labels = vec![vec![-100, -100, 3, -100, -100], vec![4, 5, -100, 7, 8]];
    let mask = vec![vec![1, 1, 1, 0, 0], vec![1, 1, 1, 1, 1]];
    let rb = batch(vec![
        ("input_ids", list_col(&ids, DataType::Int32, false)),
        ("labels", list_col(&labels, DataType::Int64, false)),
        ("attention_mask", list_col(&mask, DataType::Int32, false)),
    ]);
    write_parquet(&path, &rb, 10);
    let cfg = eval_cfg(one(&path), 6, 2);
    let mut l = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 10)).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    assert_eq!(b.input_ids, [1, 2, 3, 0, 0, 0, 4, 5, 6, 7, 8, 0]);
    assert_eq!(
        b.labels,
        [-100, -100, 3, -100, -100, -100, 4, 5, -100, 7, 8, -100]
    );
    assert_eq!(b.segment_ids, [1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0]);
    assert_eq!(b.label_tokens(), 1 + 3);
}

#[test]
fn truncation_policies() {
    let dir = tmp();
    let path = p(&dir, "long.parquet");
    let rows = vec![vec![1, 2, 3, 4, 5, 6, 7], vec![8, 9]];
    write_parquet(
        &path,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int32, false))]),
        10,
    );
    let mut cfg = eval_cfg(one(&path), 3, 1);
    assert_eq!(eval_docs(&cfg, 10), [vec![1, 2, 3], vec![8, 9]]);
    cfg.truncation = Truncation::Split;
    assert_eq!(
        eval_docs(&cfg, 10),
        [vec![1, 2, 3], vec![4, 5, 6], vec![7], vec![8, 9]]
    );
    cfg.truncation = Truncation::Error;
    let err = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 10))
        .and_then(|mut l| l.next_batch())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("long.parquet")
            && err.contains("\"input_ids\", row 0")
            && err.contains("7 tokens"),
        "{err}"
    );
}

fn load_err(cfg: &DataConfig, vocab: usize) -> String {
    match TokenLoader::new(cfg, spec(Split::Eval, 0, 1, vocab)).and_then(|mut l| {
        while l.next_batch()?.is_some() {}
        Ok(())
    }) {
        Ok(()) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_token_ids_name_file_column_and_row() {
    let dir = tmp();
    let path = p(&dir, "bad.parquet");
    let mut rows = token_rows(10, 20, |_| 4);
    rows[7][2] = 20;
    write_parquet(
        &path,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int64, false))]),
        3,
    );
    let err = load_err(&eval_cfg(one(&path), 4, 1), 20);
    assert!(
        err.contains("bad.parquet")
            && err.contains("column \"input_ids\", row 7")
            && err.contains(">= vocab_size 20"),
        "{err}"
    );

    rows[7][2] = -3;
    let neg = p(&dir, "neg.arrow");
    write_ipc(
        &neg,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int64, false))]),
        4,
        false,
    );
    let err = load_err(&eval_cfg(one(&neg), 4, 1), 20);
    assert!(
        err.contains("neg.arrow") && err.contains("row 7") && err.contains("negative token id -3"),
        "{err}"
    );

    let jl = p(&dir, "neg.jsonl");
    write_jsonl(&jl, &rows);
    let err = load_err(&eval_cfg(one(&jl), 4, 1), 20);
    assert!(err.contains("neg.jsonl") && err.contains("row 7"), "{err}");
}

#[test]
fn on_error_skip_drops_only_the_bad_rows() {
    let dir = tmp();
    let path = p(&dir, "some-bad.parquet");
    let mut rows = token_rows(6, 20, |_| 3);
    rows[1][0] = 99;
    rows[4][1] = -1;
    write_parquet(
        &path,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int64, false))]),
        2,
    );
    let mut cfg = eval_cfg(one(&path), 4, 1);
    cfg.on_error = OnError::Skip;
    let got = eval_docs(&cfg, 20);
    let want: Vec<Vec<u32>> = [0, 2, 3, 5]
        .iter()
        .map(|&i| rows[i].iter().map(|&t| t as u32).collect())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn file_level_problems_are_errors_naming_the_file_and_column() {
    let dir = tmp();
    let rows = token_rows(4, 20, |_| 3);

    let missing = p(&dir, "missing.parquet");
    write_parquet(
        &missing,
        &batch(vec![("tokens", list_col(&rows, DataType::Int32, false))]),
        10,
    );
    let err = load_err(&eval_cfg(one(&missing), 4, 1), 20);
    assert!(
        err.contains("missing.parquet")
            && err.contains("missing column \"input_ids\"")
            && err.contains("tokens"),
        "{err}"
    );

    let wrong = p(&dir, "wrong.parquet");
    write_parquet(
        &wrong,
        &batch(vec![("input_ids", str_col(&["a", "b"]))]),
        10,
    );
    let err = load_err(&eval_cfg(one(&wrong), 4, 1), 20);
    assert!(
        err.contains("wrong.parquet") && err.contains("column \"input_ids\" has type Utf8"),
        "{err}"
    );

    let floats = p(&dir, "floats.arrow");
    write_ipc(
        &floats,
        &batch(vec![(
            "input_ids",
            list_col(&rows, DataType::Float32, false),
        )]),
        10,
        true,
    );
    let err = load_err(&eval_cfg(one(&floats), 4, 1), 20);
    assert!(
        err.contains("floats.arrow") && err.contains("expected list<int32"),
        "{err}"
    );

    let empty = p(&dir, "empty.parquet");
    std::fs::write(&empty, b"").unwrap();
    let err = load_err(&eval_cfg(one(&empty), 4, 1), 20);
    assert!(err.contains("empty.parquet: file is empty"), "{err}");

    let no_rows = p(&dir, "no-rows.parquet");
    write_parquet(
        &no_rows,
        &batch(vec![("input_ids", list_col(&[], DataType::Int32, false))]),
        10,
    );
    let err = load_err(&eval_cfg(one(&no_rows), 4, 1), 20);
    assert!(err.contains("no-rows.parquet: file is empty"), "{err}");

    let corrupt = p(&dir, "corrupt.parquet");
    let mut bytes = std::fs::read(&missing).unwrap();
    let n = bytes.len();
    bytes[n - 12..n - 4].fill(0xAB);
    std::fs::write(&corrupt, &bytes).unwrap();
    let err = load_err(&eval_cfg(one(&corrupt), 4, 1), 20);
    assert!(err.contains("corrupt.parquet: corrupt"), "{err}");

    let truncated = p(&dir, "truncated.arrow");
    write_ipc(
        &truncated,
        &batch(vec![("input_ids", list_col(&rows, DataType::Int32, false))]),
        2,
        true,
    );
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 30]).unwrap();
    let err = load_err(&eval_cfg(one(&truncated), 4, 1), 20);
    assert!(err.contains("truncated.arrow: corrupt"), "{err}");

    let junk = p(&dir, "junk.arrow");
    let mut bytes = b"ARROW1\0\0".to_vec();
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xf0, 0xff, 0xff, 0x7f]);
    bytes.extend_from_slice(&[7u8; 40]);
    bytes.extend_from_slice(b"\x10\0\0\0ARROW1");
    std::fs::write(&junk, &bytes).unwrap();
    let err = load_err(&eval_cfg(one(&junk), 4, 1), 20);
    assert!(err.contains("junk.arrow: corrupt"), "{err}");

    let garbage = p(&dir, "garbage.jsonl");
    std::fs::write(&garbage, "{\"input_ids\": [1, 2]}\nnot json\n").unwrap();
    let err = load_err(&eval_cfg(one(&garbage), 4, 1), 20);
    assert!(
        err.contains("garbage.jsonl") && err.contains("row 1") && err.contains("invalid JSON"),
        "{err}"
    );

    let mismatch = p(&dir, "mismatch.parquet");
    let labels = vec![vec![1, 2, 3], vec![1, 2], vec![1, 2, 3], vec![1, 2, 3]];
    write_parquet(
        &mismatch,
        &batch(vec![
            ("input_ids", list_col(&rows, DataType::Int32, false)),
            ("labels", list_col(&labels, DataType::Int32, false)),
        ]),
        10,
    );
    let err = load_err(&eval_cfg(one(&mismatch), 4, 1), 20);
    assert!(
        err.contains("mismatch.parquet")
            && err.contains("column \"labels\", row 1")
            && err.contains("2 values"),
        "{err}"
    );
}

#[test]
fn invalid_config_lists_every_key() {
    let mut cfg = DataConfig::new(Files::One("x.parquet".into()));
    cfg.seq_len = 1;
    cfg.batch_size = 0;
    let err = TokenLoader::new(&cfg, spec(Split::Train, 0, 1, 10))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("data.seq_len: must be >= 2, got 1") && msg.contains("data.batch_size"),
        "{msg}"
    );
}
