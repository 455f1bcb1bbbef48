//! `bellows bench`: one JSON line of training throughput, comparable with
//! `benches/peer/torch_lora_bench.py` (same shapes, optimizer and FLOP formula).

use std::process::ExitCode;

use clap::{Args, ValueEnum};

use bellows_trainer::config::Precision;
use bellows_trainer::{bench_on, BenchMode, BenchSpec};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Lora,
    Qlora,
    Full,
    Tiny,
    Forward,
    #[value(name = "lora-1b")]
    Lora1b,
    Gemm,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Prec {
    F32,
    Bf16,
    Fp16,
}

/// Options of `bellows bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Workload: LoRA r16 on the small Llama, the same on its NF4-quantized base (QLoRA), full fine-tune of it, LoRA on a tiny Llama, inference forward passes of the small Llama, LoRA on a 1.1B Llama (GPU), or the backend's matrix-product rate on the small Llama's products (one line per product).
    #[arg(long, value_enum, default_value = "lora")]
    mode: Mode,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute precision (master weights stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Prec,
    /// Batch size (default: the mode's).
    #[arg(long)]
    batch: Option<usize>,
    /// Sequence length (default: the mode's).
    #[arg(long)]
    seq: Option<usize>,
    /// The device's measured peak TFLOP/s, to report model FLOP utilisation.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Compute threads (0 = all cores; CPU only).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 6)]
    steps: usize,
}

/// Runs the benchmark and prints the report.
pub fn bench(a: BenchArgs) -> ExitCode {
    if let Mode::Gemm = a.mode {
        return gemm(&a);
    }
    let spec = BenchSpec {
        mode: match a.mode {
            Mode::Lora => BenchMode::Lora,
            Mode::Qlora => BenchMode::Qlora,
            Mode::Full => BenchMode::Full,
            Mode::Tiny => BenchMode::Tiny,
            Mode::Forward => BenchMode::Forward,
            Mode::Lora1b => BenchMode::Lora1b,
            Mode::Gemm => unreachable!("handled above"),
        },
        warmup: a.warmup,
        steps: a.steps.max(1),
        precision: match a.precision {
            Prec::F32 => Precision::F32,
            Prec::Bf16 => Precision::Bf16,
            Prec::Fp16 => Precision::Fp16,
        },
        batch: a.batch,
        seq: a.seq,
        peak_tflops: a.peak_tflops,
    };
    match bench_on(&spec, &a.device, a.threads) {
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

/// `--mode gemm`: one JSON line per product of `bellows_trainer::GEMM_CASES`.
fn gemm(a: &BenchArgs) -> ExitCode {
    let dtype = match a.precision {
        Prec::F32 => burn::tensor::DType::F32,
        Prec::Bf16 => burn::tensor::DType::BF16,
        Prec::Fp16 => burn::tensor::DType::F16,
    };
    match bellows_trainer::gemm_bench_on(dtype, &a.device, a.threads) {
        Ok(lines) => {
            for r in lines {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
