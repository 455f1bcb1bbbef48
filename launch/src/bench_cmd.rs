//! `bellows bench`: one JSON line of training throughput, comparable with
//! `benches/peer/torch_lora_bench.py` (same shapes, optimizer and FLOP formula).

use std::process::ExitCode;

use clap::{Args, ValueEnum};

use bellows_trainer::{init_threads, run_bench, BenchMode, CpuBackend};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Lora,
    Qlora,
    Full,
    Tiny,
    Forward,
}

/// Options of `bellows bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Workload: LoRA r16 on the small Llama, the same on its NF4-quantized base (QLoRA), full fine-tune of it, LoRA on a tiny Llama, or inference forward passes of the small Llama.
    #[arg(long, value_enum, default_value = "lora")]
    mode: Mode,
    /// Compute threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 6)]
    steps: usize,
}

/// Runs the benchmark on the CPU backend and prints the report.
pub fn bench(a: BenchArgs) -> ExitCode {
    init_threads(a.threads, 1);
    let mode = match a.mode {
        Mode::Lora => BenchMode::Lora,
        Mode::Qlora => BenchMode::Qlora,
        Mode::Full => BenchMode::Full,
        Mode::Tiny => BenchMode::Tiny,
        Mode::Forward => BenchMode::Forward,
    };
    let r = run_bench::<CpuBackend>(mode, a.warmup, a.steps.max(1), &Default::default());
    println!("{}", serde_json::to_string(&r).unwrap_or_default());
    ExitCode::SUCCESS
}
