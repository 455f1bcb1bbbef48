//! Compares burn's CPU backends on a real training step (the `bellows bench` workloads):
//! Flex (the backend bellows uses) against NdArray.
//!
//! ```sh
//! cargo run --release -p bellows-trainer --features ndarray --example backend_compare -- [tiny|lora|full] [steps]
//! ```
//! Prints one JSON line per backend. Results are recorded in `docs/BENCHMARKS.md`.

use bellows_trainer::config::Precision;
use bellows_trainer::{init_threads, run_bench, BenchMode, BenchSpec};
use burn::backend::{Autodiff, Flex, NdArray};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = match args.get(1).map(String::as_str) {
        Some("tiny") => BenchMode::Tiny,
        Some("full") => BenchMode::Full,
        _ => BenchMode::Lora,
    };
    let steps = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    init_threads(0, 1);
    let spec = BenchSpec {
        mode,
        warmup: 1,
        steps,
        precision: Precision::F32,
        batch: None,
        seq: None,
        peak_tflops: None,
    };
    let flex = run_bench::<Autodiff<Flex>>(&spec, &Default::default());
    println!(
        "{{\"backend\":\"flex\",\"report\":{}}}",
        serde_json::to_string(&flex).unwrap_or_default()
    );
    let nd = run_bench::<Autodiff<NdArray>>(&spec, &Default::default());
    println!(
        "{{\"backend\":\"ndarray\",\"report\":{}}}",
        serde_json::to_string(&nd).unwrap_or_default()
    );
}
