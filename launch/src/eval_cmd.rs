//! `bellows eval`: prints `{"loss", "perplexity", "tokens", "rows"}` as one JSON line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::adapter_args::AdapterArgs;
use bellows_trainer::{evaluate_dir, evaluate_model, EvalOptions};

use crate::quantize_arg::QuantizeArg;

/// Options of `bellows eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// A Parquet / Arrow IPC / JSONL file with an `input_ids` column (and optional `labels`).
    #[arg(long)]
    data: PathBuf,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Evaluate at most this many rows.
    #[arg(long)]
    max_rows: Option<usize>,
    /// Pad rows to this length; a longer row is an error naming it.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Quantize the model's decoder linears to 4 bits while loading (a bitsandbytes 4-bit
    /// checkpoint loads quantized without it).
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
}

/// Runs the evaluation and prints the report.
pub fn eval(a: EvalArgs) -> ExitCode {
    let opts = EvalOptions {
        batch_size: a.batch_size,
        max_rows: a.max_rows,
        seq_len: a.seq_len,
        quantize: a.quantize.map(QuantizeArg::options),
    };
    let report = if !a.adapters.combines() {
        evaluate_dir(&a.model, a.adapters.single(), &a.data, &opts).map_err(anyhow::Error::from)
    } else {
        a.adapters
            .load(&a.model, opts.quantize)
            .and_then(|(arch, model)| Ok(evaluate_model(&model, arch.vocab_size, &a.data, &opts)?))
    };
    match report {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
