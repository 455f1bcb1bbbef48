//! A deterministic synthetic dataset for the quickstart.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Int32Builder, ListBuilder, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Rows per Parquet row group in the synthetic files (the unit of sharding and shuffling).
pub const SYNTH_ROW_GROUP_ROWS: usize = 64;
/// Steps of the arithmetic progressions are drawn uniformly from `1..=SYNTH_MAX_STEP`.
pub const SYNTH_MAX_STEP: u32 = 4;

/// Shape and seed of a synthetic dataset.
///
/// Each row is an arithmetic progression modulo `vocab_size`: `x_t = (a + t·d) mod V` with `a` drawn
/// uniformly from `0..V` and the step `d` uniformly from `1..=SYNTH_MAX_STEP`.
///
/// Why the loss must fall far below chance: an untrained model pays `ln V` nats per token
/// (5.55 for V = 256). A model that learns only the bigram "next is `x_t + d` for one of 4 small `d`"
/// already pays just `ln 4 = 1.39`, a quarter of chance; a bigram table is what a transformer's
/// embedding and unembedding learn first. Once it also looks one token back (a previous-token
/// attention head), `d = x_t − x_{t−1}` is known, so every target after the second is certain; only
/// position 1 keeps `ln 4`, so the floor is `ln 4 / (seq_len − 1)` ≈ 0.02 nats for seq_len 64.
/// A loss under 1.39 therefore shows the model uses context.
///
/// Measured with `configs/quickstart.toml` (2-layer Llama, hidden 128, batch 16, lr 3e-3, one CPU
/// process, `--set run.max_steps=150`): loss 5.58 at step 1, 0.73 at step 40, 0.06 at step 150, eval 0.057.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthSpec {
    /// Number of rows.
    pub rows: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Vocabulary size `V` (token ids are in `0..V`).
    pub vocab_size: usize,
    /// Seed of the ChaCha8 stream that draws `a` and `d`.
    pub seed: u64,
}

/// The rows of `spec`, in order (what [`write_synthetic_parquet`] writes).
pub fn synthetic_rows(spec: &SynthSpec) -> Vec<Vec<i32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let v = spec.vocab_size.max(1) as u64;
    (0..spec.rows)
        .map(|_| {
            let a = rng.random_range(0..v);
            let d = u64::from(rng.random_range(1..=SYNTH_MAX_STEP));
            (0..spec.seq_len as u64)
                .map(|t| ((a + t * d) % v) as i32)
                .collect()
        })
        .collect()
}

/// Writes `spec`'s rows to a zstd Parquet file with one `input_ids: list<int32>` column and row
/// groups of [`SYNTH_ROW_GROUP_ROWS`] rows. The same spec always gives the same rows.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("synth.parquet");
/// let spec = bellows_data::SynthSpec { rows: 100, seq_len: 16, vocab_size: 64, seed: 1 };
/// bellows_data::write_synthetic_parquet(&path, &spec)?;
/// # Ok::<(), bellows_data::Error>(())
/// ```
///
/// # Errors
/// An invalid spec ([`Error::Config`]), or the file cannot be written.
pub fn write_synthetic_parquet(path: &Path, spec: &SynthSpec) -> Result<()> {
    let mut issues = Vec::new();
    if spec.rows == 0 {
        issues.push(("synth.rows".to_string(), "must be >= 1, got 0".to_string()));
    }
    if spec.seq_len < 2 {
        issues.push((
            "synth.seq_len".into(),
            format!("must be >= 2, got {}", spec.seq_len),
        ));
    }
    if spec.vocab_size < 2 || spec.vocab_size > i32::MAX as usize {
        issues.push((
            "synth.vocab_size".into(),
            format!("must be in 2..=2^31-1, got {}", spec.vocab_size),
        ));
    }
    if !issues.is_empty() {
        return Err(Error::Config(issues));
    }
    let item = Arc::new(Field::new("item", DataType::Int32, false));
    let schema = Arc::new(Schema::new(vec![Field::new(
        "input_ids",
        DataType::List(item.clone()),
        false,
    )]));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(SYNTH_ROW_GROUP_ROWS))
        .build();
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
        .map_err(|e| Error::corrupt(path, e))?;
    for rows in synthetic_rows(spec).chunks(SYNTH_ROW_GROUP_ROWS) {
        let mut b = ListBuilder::new(Int32Builder::new()).with_field(item.clone());
        for r in rows {
            b.values().append_slice(r);
            b.append(true);
        }
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(b.finish())])
            .map_err(|e| Error::corrupt(path, e))?;
        writer.write(&batch).map_err(|e| Error::corrupt(path, e))?;
    }
    writer.close().map_err(|e| Error::corrupt(path, e))?;
    Ok(())
}
