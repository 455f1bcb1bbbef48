//! Loader throughput and peak memory for one dataset size.
//!
//! `cargo run --release -p bellows-data --example throughput -- <rows> [pad|pack] [prefetch]`
//!
//! Writes `<rows>` pre-tokenized rows (lengths 16..=1024, mean ~520 tokens, vocab 32000, row groups of
//! 4096 rows) to a temporary Parquet file, then times opening a train loader (seq_len 1024, batch 8,
//! shuffle buffer 1024) and reading one epoch. Prints tokens/s and the process's peak RSS (VmHWM).
//! Run each size in its own process: VmHWM only grows.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Int32Builder, ListBuilder, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use bellows_data::{
    DataConfig, Files, LoaderSpec, Packing, Prefetcher, Shard, Split, TokenLoader, Truncation,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn write_data(path: &std::path::Path, rows: usize) -> anyhow::Result<u64> {
    let item = Arc::new(Field::new("item", DataType::Int32, false));
    let schema = Arc::new(Schema::new(vec![Field::new(
        "input_ids",
        DataType::List(item.clone()),
        false,
    )]));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(4096))
        .build();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path)?, schema.clone(), Some(props))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut tokens = 0u64;
    let mut done = 0;
    while done < rows {
        let n = 4096.min(rows - done);
        let mut b = ListBuilder::new(Int32Builder::new()).with_field(item.clone());
        for _ in 0..n {
            let len = rng.random_range(16..=1024);
            tokens += len as u64;
            for _ in 0..len {
                b.values().append_value(rng.random_range(0..32000));
            }
            b.append(true);
        }
        w.write(&RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(b.finish())],
        )?)?;
        done += n;
    }
    w.close()?;
    Ok(tokens)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args.get(1).map_or(Ok(10_000), |s| s.parse())?;
    let packing = match args.get(2).map(String::as_str) {
        Some("pack") => Packing::Pack,
        _ => Packing::Pad,
    };
    let prefetch = args.get(3).is_some_and(|s| s == "prefetch");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.parquet");
    let data_tokens = write_data(&path, rows)?;
    let file_mib = std::fs::metadata(&path)?.len() as f64 / (1 << 20) as f64;
    let rss_after_write = peak_rss_mib();

    let mut cfg = DataConfig::new(Files::One(path.display().to_string()));
    cfg.seq_len = 1024;
    cfg.batch_size = 8;
    cfg.packing = packing;
    cfg.truncation = Truncation::Split;
    let spec = LoaderSpec {
        split: Split::Train,
        shard: Shard::single(),
        seed: 0,
        vocab_size: 32000,
    };
    let t0 = Instant::now();
    let loader = TokenLoader::new(&cfg, spec)?;
    let open_s = t0.elapsed().as_secs_f64();
    let steps = loader.steps_in_epoch();
    let mut next: Box<dyn FnMut() -> bellows_data::Result<Option<bellows_data::Batch>>> =
        if prefetch {
            let mut p = Prefetcher::new(loader, 4);
            Box::new(move || p.next_batch())
        } else {
            let mut l = loader;
            Box::new(move || l.next_batch())
        };
    let t1 = Instant::now();
    let mut label_tokens = 0usize;
    for _ in 0..steps {
        let b = next()?.ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        label_tokens += b.label_tokens();
    }
    let read_s = t1.elapsed().as_secs_f64();
    let yielded = steps as f64 * 8.0 * 1024.0;
    println!(
        "rows={rows} mode={packing:?} prefetch={prefetch} data_tokens={data_tokens} file={file_mib:.1}MiB \
         open={open_s:.2}s epoch={read_s:.2}s steps={steps} tokens/s={:.0} label_tokens={label_tokens} \
         peak_rss_after_write={rss_after_write:.0}MiB peak_rss={:.0}MiB",
        yielded / read_s,
        peak_rss_mib()
    );
    Ok(())
}
