//! `bellows gpu-check`: the unattended GPU host check (`scripts/gpu-check.sh` wraps it with the
//! library lookup and GPU memory sampling). One JSON line per finding; exit 1 if any failed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use bellows_trainer::gpucheck::{gpu_check, GpuCheckOptions};
use bellows_trainer::BenchMode;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Tiny,
    Lora,
    #[value(name = "lora-1b")]
    Lora1b,
}

/// Options of `bellows gpu-check`.
#[derive(Debug, Args)]
pub struct GpuCheckArgs {
    /// `cuda`, `cuda:N`, or `cpu` (runs the same checks without a GPU).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// The golden folder of the repository.
    #[arg(long, default_value = "tests/golden")]
    golden: PathBuf,
    /// The job trained on the CPU and the device for the loss-curve comparison.
    #[arg(long, default_value = "configs/quickstart.toml")]
    config: PathBuf,
    /// Steps of that comparison.
    #[arg(long, default_value_t = 30)]
    train_steps: u64,
    /// Where the comparison runs write.
    #[arg(long, default_value = "runs/gpu-check")]
    out: PathBuf,
    /// Matrix size of the peak measurement.
    #[arg(long, default_value_t = 8192)]
    peak_n: usize,
    /// Timed steps of the LoRA benchmark (0 skips it).
    #[arg(long, default_value_t = 5)]
    bench_steps: usize,
    /// The benchmark workload.
    #[arg(long, value_enum, default_value = "lora-1b")]
    bench_mode: Mode,
}

/// Runs the check.
pub fn run(a: GpuCheckArgs) -> ExitCode {
    let opts = GpuCheckOptions {
        device: a.device,
        golden: a.golden,
        config: a.config,
        train_steps: a.train_steps,
        out: a.out,
        peak_n: a.peak_n,
        bench_steps: a.bench_steps,
        bench_mode: match a.bench_mode {
            Mode::Tiny => BenchMode::Tiny,
            Mode::Lora => BenchMode::Lora,
            Mode::Lora1b => BenchMode::Lora1b,
        },
    };
    let mut emit = |v: serde_json::Value| println!("{v}");
    match gpu_check(&opts, &mut emit) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"check": "error", "ok": false, "error": e.to_string()})
            );
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
