//! `bellows merge`: fold a PEFT adapter into its base model and write a plain Hugging Face folder.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::backend::Flex;
use clap::Args;

/// Files of the base folder copied unchanged next to the merged weights, when present.
const COPIED: [&str; 5] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
];

/// `bellows merge --base <DIR> --adapter <DIR> --out <DIR>`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model folder (`config.json` + safetensors).
    #[arg(long)]
    base: PathBuf,
    /// The PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`); LoRA, rsLoRA or DoRA.
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged model (created if needed).
    #[arg(long)]
    out: PathBuf,
}

/// Runs the command: exit 0 on success, 1 with `error: <file>: <problem>` otherwise.
pub fn run(args: &MergeArgs) -> ExitCode {
    match merge(args) {
        Ok(()) => {
            println!(
                "merged {} into {}",
                args.adapter.display(),
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

fn merge(args: &MergeArgs) -> anyhow::Result<()> {
    let dev = Default::default();
    let (arch, _, model) =
        bellows_models::load_pretrained_with_adapter::<Flex>(&args.base, &args.adapter, &dev)?;
    bellows_models::save_pretrained(&model.merge_adapters(), &arch, &args.out)?;
    for name in COPIED {
        copy_if_present(&args.base.join(name), &args.out.join(name))?;
    }
    Ok(())
}

fn copy_if_present(from: &Path, to: &Path) -> anyhow::Result<()> {
    if from.is_file() {
        std::fs::copy(from, to)
            .map_err(|e| anyhow::anyhow!("{} -> {}: {e}", from.display(), to.display()))?;
    }
    Ok(())
}
