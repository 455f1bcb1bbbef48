//! Loader throughput and peak memory for one dataset size.
//!
//! ```text
//! cargo run --release -p bellows-data --example throughput -- write <rows> <file.parquet>
//! cargo run --release -p bellows-data --example throughput -- read <file.parquet> [pad|pad-truncate|pack] [prefetch]
//! ```
//!
//! `write` makes `<rows>` pre-tokenized rows (lengths uniform in 16..=1024, mean ~520 tokens, vocab
//! 32000, zstd, row groups of 4096 rows). `read` times opening a train loader (seq_len 1024, batch 8,
//! `truncation = "split"`, shuffle buffer 1024) and reading one epoch, and prints tokens/s (real tokens,
//! not padding), positions/s (batch slots incl. padding) and the process's peak RSS (VmHWM), so
//! reading runs in its own process.

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") if args.len() == 3 => {
            let rows: usize = args[1].parse()?;
            let tokens = write_data(std::path::Path::new(&args[2]), rows)?;
            println!("wrote {rows} rows, {tokens} tokens to {}", args[2]);
            Ok(())
        }
        Some("read") if args.len() >= 2 => read(&args[1], args.get(2), args.get(3)),
        _ => anyhow::bail!(
            "usage: throughput write <rows> <file> | throughput read <file> [pad|pad-truncate|pack] [prefetch]"
        ),
    }
}

fn read(path: &str, mode: Option<&String>, prefetch: Option<&String>) -> anyhow::Result<()> {
    let (packing, truncation) = match mode.map(String::as_str) {
        Some("pack") => (Packing::Pack, Truncation::Split),
        Some("pad-truncate") => (Packing::Pad, Truncation::Truncate),
        _ => (Packing::Pad, Truncation::Split),
    };
    let prefetch = prefetch.is_some_and(|s| s == "prefetch");
    let file_mib = std::fs::metadata(path)?.len() as f64 / (1 << 20) as f64;
    let mut cfg = DataConfig::new(Files::One(path.to_string()));
    cfg.seq_len = 1024;
    cfg.batch_size = 8;
    cfg.packing = packing;
    cfg.truncation = truncation;
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
    let mut real_tokens = 0usize;
    let mut middle = None;
    for step in 0..steps {
        let b = next()?.ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        real_tokens += b.segment_ids.iter().filter(|&&s| s > 0).count();
        if step == steps / 2 {
            middle = Some(b.state_after);
        }
    }
    let read_s = t1.elapsed().as_secs_f64();
    drop(next);
    let state = middle.ok_or_else(|| anyhow::anyhow!("no batches"))?;
    let t2 = Instant::now();
    let mut resumed = TokenLoader::resume(&cfg, spec, &state)?;
    resumed.next_batch()?;
    let resume_s = t2.elapsed().as_secs_f64();
    let positions = steps as f64 * 8.0 * 1024.0;
    println!(
        "file={file_mib:.0}MiB mode={packing:?}/{truncation:?} prefetch={prefetch} open={open_s:.2}s \
         epoch={read_s:.2}s steps={steps} tokens/s={:.2e} positions/s={:.2e} \
         resume_mid_epoch+1_batch={resume_s:.2}s peak_rss={:.0}MiB",
        real_tokens as f64 / read_s,
        positions / read_s,
        peak_rss_mib()
    );
    Ok(())
}
