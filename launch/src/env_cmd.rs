//! `bellows env`: what this build and machine offer.

use bellows_trainer::cuda_available;

/// Prints version, backends, devices and thread counts as JSON.
pub fn print() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let v = serde_json::json!({
        "bellows": env!("CARGO_PKG_VERSION"),
        "burn": "0.21.0",
        "cpu_backend": "flex (rayon + AVX-512 gemm when the CPU has it)",
        "cuda_feature": cfg!(feature = "cuda"),
        "cuda_driver_present": cuda_available(),
        "cores": cores,
        "rayon_threads_env": std::env::var("RAYON_NUM_THREADS").ok(),
    });
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}
