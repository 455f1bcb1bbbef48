//! Helpers that write real Parquet, Arrow IPC and JSONL files for the tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Builder, ListBuilder, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use bellows_data::{Batch, DataConfig, Files, LoaderSpec, Shard, Split, TokenLoader};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

/// A list column of `rows` with element type `elem`; `large` gives `large_list`.
pub fn list_col(rows: &[Vec<i64>], elem: DataType, large: bool) -> ArrayRef {
    let mut b = ListBuilder::new(Int64Builder::new());
    for r in rows {
        b.values().append_slice(r);
        b.append(true);
    }
    let a: ArrayRef = Arc::new(b.finish());
    let field = Arc::new(Field::new("item", elem, true));
    let to = if large {
        DataType::LargeList(field)
    } else {
        DataType::List(field)
    };
    arrow::compute::cast(&a, &to).unwrap()
}

pub fn str_col(rows: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(rows.to_vec()))
}

pub fn batch(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = cols
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        cols.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap()
}

/// Token rows: row i has `len(i)` tokens `(i * 7 + j) % vocab`.
pub fn token_rows(n: usize, vocab: i64, len: impl Fn(usize) -> usize) -> Vec<Vec<i64>> {
    (0..n)
        .map(|i| {
            (0..len(i))
                .map(|j| (i as i64 * 7 + j as i64) % vocab)
                .collect()
        })
        .collect()
}

/// Writes `rb` as Parquet with row groups of `rg_rows` rows.
pub fn write_parquet(path: &Path, rb: &RecordBatch, rg_rows: usize) {
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rg_rows))
        .build();
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, rb.schema(), Some(props)).unwrap();
    let mut off = 0;
    while off < rb.num_rows() {
        let n = rg_rows.min(rb.num_rows() - off);
        w.write(&rb.slice(off, n)).unwrap();
        w.flush().unwrap();
        off += n;
    }
    w.close().unwrap();
}

/// Writes `rb` as an Arrow IPC file (`stream = false`) or stream, in record batches of `per` rows.
pub fn write_ipc(path: &Path, rb: &RecordBatch, per: usize, stream: bool) {
    let f = std::fs::File::create(path).unwrap();
    let parts: Vec<RecordBatch> = (0..rb.num_rows())
        .step_by(per)
        .map(|o| rb.slice(o, per.min(rb.num_rows() - o)))
        .collect();
    if stream {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(f, &rb.schema()).unwrap();
        for p in &parts {
            w.write(p).unwrap();
        }
        w.finish().unwrap();
    } else {
        let mut w = arrow::ipc::writer::FileWriter::try_new(f, &rb.schema()).unwrap();
        for p in &parts {
            w.write(p).unwrap();
        }
        w.finish().unwrap();
    }
}

pub fn write_jsonl(path: &Path, rows: &[Vec<i64>]) {
    let text: String = rows
        .iter()
        .map(|r| format!("{}\n", serde_json::json!({ "input_ids": r })))
        .collect();
    std::fs::write(path, text).unwrap();
}

pub fn cfg(path: &Path, seq_len: usize, batch_size: usize) -> DataConfig {
    let mut c = DataConfig::new(Files::One(path.display().to_string()));
    c.seq_len = seq_len;
    c.batch_size = batch_size;
    c
}

pub fn spec(split: Split, rank: usize, world: usize, vocab: usize) -> LoaderSpec {
    LoaderSpec {
        split,
        shard: Shard { rank, world },
        seed: 42,
        vocab_size: vocab,
    }
}

pub fn take(loader: &mut TokenLoader, n: usize) -> Vec<Batch> {
    (0..n)
        .map(|_| loader.next_batch().unwrap().expect("a batch"))
        .collect()
}

/// All batches until `None` (eval), with a safety cap.
pub fn drain(loader: &mut TokenLoader) -> Vec<Batch> {
    let mut out = Vec::new();
    while let Some(b) = loader.next_batch().unwrap() {
        out.push(b);
        assert!(out.len() < 100_000, "eval never ended");
    }
    out
}

/// The documents (non-padding token runs per segment) of a batch's rows.
pub fn segments(b: &Batch) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for r in 0..b.batch_size {
        let row = r * b.seq_len..(r + 1) * b.seq_len;
        let mut cur: Option<(u32, Vec<u32>)> = None;
        for i in row {
            let s = b.segment_ids[i];
            if s == 0 {
                continue;
            }
            match &mut cur {
                Some((cs, v)) if *cs == s => v.push(b.input_ids[i]),
                _ => {
                    if let Some((_, v)) = cur.take() {
                        out.push(v);
                    }
                    cur = Some((s, vec![b.input_ids[i]]));
                }
            }
        }
        if let Some((_, v)) = cur {
            out.push(v);
        }
    }
    out
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn p(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}
