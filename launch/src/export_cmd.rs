//! `bellows export`: a checkpoint (sharded or not, from any number of ranks) as a plain Hugging
//! Face model folder or PEFT adapter folder.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

/// `bellows export <CHECKPOINT> --out <DIR>`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The checkpoint folder (`<output_dir>/checkpoints/checkpoint-<step>`).
    checkpoint: PathBuf,
    /// Where to write `model/` (full fine-tuning) or `adapter/` (adapters); created if needed.
    #[arg(long)]
    out: PathBuf,
}

/// Runs the command: exit 0 on success, 1 with `error: <file>: <problem>` otherwise.
pub fn run(args: &ExportArgs) -> ExitCode {
    match bellows_trainer::checkpoint::export_checkpoint(&args.checkpoint, &args.out) {
        Ok(folder) => {
            println!(
                "exported {} to {}",
                args.checkpoint.display(),
                folder.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
