//! `bellows combine-adapters`: PEFT's `add_weighted_adapter` on adapter folders, written as a new
//! PEFT adapter folder.

use std::path::PathBuf;
use std::process::ExitCode;

use bellows_models::{linear_sites, read_adapter_set, read_arch, save_adapter_set};
use bellows_peft::{combine_adapters, Combination};
use burn::backend::Flex;
use clap::Args;

/// `bellows combine-adapters --base <DIR> --adapter <DIR> --adapter <DIR> --weights 0.7,0.3 --out <DIR>`.
#[derive(Debug, Args)]
pub struct CombineArgs {
    /// The base model folder the adapters belong to (only its `config.json` is read).
    #[arg(long)]
    base: PathBuf,
    /// A PEFT adapter folder (LoRA / rsLoRA, all of the same rank). Repeat for each adapter.
    #[arg(long, required = true)]
    adapter: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (negative subtracts an adapter).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        allow_hyphen_values = true
    )]
    weights: Vec<f64>,
    /// The combination type; only PEFT's `linear` is implemented.
    #[arg(long, default_value = "linear")]
    combination: String,
    /// Where to write the combined adapter (created if needed).
    #[arg(long)]
    out: PathBuf,
}

/// Runs the command: exit 0 on success, 1 with `error: <problem>` otherwise.
pub fn run(args: &CombineArgs) -> ExitCode {
    match combine(args) {
        Ok(n) => {
            println!(
                "combined {} adapters ({n} layers) into {}",
                args.adapter.len(),
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn combine(args: &CombineArgs) -> anyhow::Result<usize> {
    anyhow::ensure!(
        args.adapter.len() == args.weights.len(),
        "{} adapters but {} weights",
        args.adapter.len(),
        args.weights.len()
    );
    let combination: Combination = args.combination.parse()?;
    let sites = linear_sites(&read_arch(&args.base)?);
    let dev = Default::default();
    let sets = args
        .adapter
        .iter()
        .map(|d| read_adapter_set::<Flex>(d, &sites, &dev))
        .collect::<Result<Vec<_>, _>>()?;
    let parts: Vec<_> = sets.iter().zip(args.weights.iter().copied()).collect();
    let combined = combine_adapters(&parts, &sites, combination)?;
    std::fs::create_dir_all(&args.out)?;
    save_adapter_set(&combined, &args.base.display().to_string(), &args.out)?;
    Ok(combined.layers.len())
}
