//! Writes the quickstart's synthetic Parquet files into `configs/data/`.
//!
//! Run from the repository root: `cargo run -p bellows-data --example write_quickstart_data`.
//! The specs here must match `crates/data/tests/synth.rs`, which checks the committed files.

use bellows_data::{write_synthetic_parquet, SynthSpec};

fn main() -> anyhow::Result<()> {
    let dir = std::path::Path::new("configs/data");
    std::fs::create_dir_all(dir)?;
    let train = SynthSpec {
        rows: 4000,
        seq_len: 64,
        vocab_size: 256,
        seed: 1,
    };
    let eval = SynthSpec {
        rows: 256,
        seq_len: 64,
        vocab_size: 256,
        seed: 2,
    };
    for (name, spec) in [
        ("quickstart-train.parquet", train),
        ("quickstart-eval.parquet", eval),
    ] {
        let path = dir.join(name);
        write_synthetic_parquet(&path, &spec)?;
        println!(
            "{}: {} bytes, {spec:?}",
            path.display(),
            std::fs::metadata(&path)?.len()
        );
    }
    Ok(())
}
