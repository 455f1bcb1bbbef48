//! The bellows trainer: the job file ([`RunConfig`]), the [`Accelerator`] handle, gradient
//! helpers, metrics outputs and the training recipe ([`train`]).
//!
//! Sits above `bellows-dist`, `bellows-data`, `bellows-peft` and `bellows-models`; only the
//! `bellows` binary sits above it.
//!
//! ```no_run
//! use bellows_trainer::{train, RunConfig};
//! let cfg = RunConfig::load("configs/quickstart.toml".as_ref(), &["run.max_steps=10".into()]).unwrap();
//! let report = train(&cfg).unwrap();
//! println!("loss {} -> {}", report.first_loss, report.final_loss);
//! ```
#![warn(missing_docs)]

mod accelerator;
pub mod adamw;
mod alloc;
mod bench;
mod bench_gemm;
mod build;
pub mod checkpoint;
pub mod config;
mod device;
mod error;
mod eval;
pub mod fsdp;
pub mod gpucheck;
pub mod grads;
mod health;
mod metrics;
pub mod plan;
pub mod precision;
mod progress;
mod recipe;
mod schedule;
pub mod tensorboard;
mod update;
mod validate;
mod warm;
pub mod zero;

pub use accelerator::Accelerator;
pub use alloc::keep_freed_memory;
pub use bench::{peak_rss_mib, run_bench, BenchMode, BenchReport, BenchSpec};
pub use bench_gemm::{run_fused_gemm_bench, run_gemm_bench, GemmCase, GemmReport, GEMM_CASES};
pub use build::{build_model, build_model_sharded};
pub use config::{ConfigIssue, ConfigIssues, RunConfig};
pub use device::{cuda_available, DeviceSpec};
pub use error::{Error, Result};
pub use eval::{evaluate_dir, evaluate_model, EvalOptions, EvalReport};
pub use metrics::{MetricsSink, StepMetrics};
pub use recipe::{batch_loss, evaluate, save_final, train_on, TrainReport};
pub use schedule::lr_at;
pub use warm::keep_warm;

/// The CPU training backend: burn's Flex (pure Rust, rayon + AVX-512 GEMM) under autodiff.
pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;

/// A short stable hash of the resolved config; ranks with different jobs refuse each other.
pub fn config_hash(cfg: &RunConfig) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(cfg.to_toml().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Threads for one worker: `threads` if set, else this machine's cores split evenly between the
/// `local_world` processes of the node (at least 1), so N workers on N cores do not oversubscribe.
pub fn thread_count(threads: usize, local_world: usize, cores: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        (cores / local_world.max(1)).max(1)
    }
}

/// Sizes the global CPU thread pool per [`thread_count`] and returns the size.
pub fn init_threads(threads: usize, local_world: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = thread_count(threads, local_world, cores);
    // The global pool can only be built once per process; a second call keeps the first size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    n
}

/// Runs `f` on the calling thread made the first of a thread pool of `threads` threads of its
/// own: the fused ops' parallel passes then start from inside the pool, where rayon hands work
/// to the other threads by work stealing, instead of being injected from outside and the caller
/// put to sleep until they finish (two context switches per parallel pass). The caller's own
/// thread, so that the loop's tensors come from its allocator arena (the main thread's heap,
/// which `keep_freed_memory` keeps; another thread's arena unmaps its 64 MiB heaps as they
/// empty, and the next step faults them in again). A pool of its own, not the global one: a
/// long job on a global worker would let that worker, while it waits inside a pass, pick up
/// another caller's whole job (a second `train` in the same process) and run it first. Runs
/// `f` as a plain call where no such pool can be made (a caller already on a pool's thread).
/// The one process of its machine that runs such a pool: [`on_node_pool`] with 1.
pub fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    on_node_pool(threads, 1, f)
}

/// [`on_pool`] for one of `processes` processes of this machine that each run such a pool (the
/// node's ranks): where their threads together fit the cores, [`keep_warm`] lets the pool's
/// other threads wait actively during steps; where they do not, it does nothing — a thread
/// looking for work would take turns on a core with another process's thread that has some.
pub fn on_node_pool<R: Send>(threads: usize, processes: usize, f: impl FnOnce() -> R + Send) -> R {
    let warm = warm::Warm::for_pool(threads.max(1), processes);
    pool_run(threads, warm, f)
}

/// [`on_node_pool`] with the pool's active-waiting state given.
pub(crate) fn pool_run<R: Send>(
    threads: usize,
    warm: warm::Warm,
    f: impl FnOnce() -> R + Send,
) -> R {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .use_current_thread()
        .thread_name(|i| format!("bellows-cpu-{i}"))
        .build()
    {
        Ok(pool) => pool.install(|| {
            let _warm = warm::enter(warm.into());
            f()
        }),
        Err(_) => f(),
    }
}

/// Runs the job: joins the process group, picks the device, trains, saves.
///
/// # Errors
/// Any failure, with the file, key, rank or op it concerns.
pub fn train(cfg: &RunConfig) -> Result<TrainReport> {
    let acc = Accelerator::new(&cfg.dist, &config_hash(cfg))?;
    match DeviceSpec::parse(&cfg.train.device).map_err(|m| Error::Device {
        device: cfg.train.device.clone(),
        message: m,
    })? {
        DeviceSpec::Cpu => {
            let n = init_threads(cfg.train.threads, acc.local_world_size());
            on_node_pool(n, acc.local_world_size(), || {
                train_on::<CpuBackend>(cfg, &acc, &Default::default())
            })
        }
        DeviceSpec::Cuda(index) => cuda_train(cfg, &acc, index),
    }
}

/// Runs `bellows bench`'s workload on `device` (`"cpu"`, `"cuda"` or `"cuda:N"`).
///
/// # Errors
/// An invalid or unavailable device.
pub fn bench_on(spec: &BenchSpec, device: &str, threads: usize) -> Result<BenchReport> {
    let err = |m: String| Error::Device {
        device: device.to_string(),
        message: m,
    };
    match DeviceSpec::parse(device).map_err(err)? {
        DeviceSpec::Cpu => {
            let n = init_threads(threads, 1);
            Ok(on_pool(n, || {
                run_bench::<CpuBackend>(spec, &Default::default())
            }))
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => {
            if !cuda_available() {
                return Err(err("no CUDA driver (libcuda) found on this machine".into()));
            }
            let d = burn::backend::cuda::CudaDevice::new(index.unwrap_or(0));
            Ok(run_bench::<burn::backend::Autodiff<burn::backend::Cuda>>(
                spec, &d,
            ))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => Err(err(
            "this bellows was built without CUDA support; rebuild with `--features cuda`".into(),
        )),
    }
}

/// Runs `bellows bench --mode gemm` on `device`: every product of [`GEMM_CASES`] in `dtype` on
/// the backend, then (CPU) on the fused ops' kernels.
///
/// # Errors
/// An invalid or unavailable device.
pub fn gemm_bench_on(
    dtype: burn::tensor::DType,
    device: &str,
    threads: usize,
) -> Result<Vec<GemmReport>> {
    let err = |m: String| Error::Device {
        device: device.to_string(),
        message: m,
    };
    match DeviceSpec::parse(device).map_err(err)? {
        DeviceSpec::Cpu => {
            init_threads(threads, 1);
            let mut lines = run_gemm_bench::<burn::backend::Flex>(dtype, &Default::default());
            lines.extend(run_fused_gemm_bench(dtype).unwrap_or_default());
            Ok(lines)
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => {
            if !cuda_available() {
                return Err(err("no CUDA driver (libcuda) found on this machine".into()));
            }
            let d = burn::backend::cuda::CudaDevice::new(index.unwrap_or(0));
            Ok(run_gemm_bench::<burn::backend::Cuda>(dtype, &d))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => Err(err(
            "this bellows was built without CUDA support; rebuild with `--features cuda`".into(),
        )),
    }
}

#[cfg(feature = "cuda")]
fn cuda_train(cfg: &RunConfig, acc: &Accelerator, index: Option<usize>) -> Result<TrainReport> {
    if !cuda_available() {
        return Err(Error::Device {
            device: cfg.train.device.clone(),
            message: "no CUDA driver (libcuda) found on this machine".into(),
        });
    }
    let device = burn::backend::cuda::CudaDevice::new(index.unwrap_or(acc.local_rank()));
    train_on::<burn::backend::Autodiff<burn::backend::Cuda>>(cfg, acc, &device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_train(cfg: &RunConfig, _acc: &Accelerator, _index: Option<usize>) -> Result<TrainReport> {
    Err(Error::Device {
        device: cfg.train.device.clone(),
        message: "this bellows was built without CUDA support; rebuild with `--features cuda`"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::{on_pool, thread_count};

    /// The job runs on the calling thread, a thread of a pool of the given size, and two jobs
    /// started together from two threads both finish (each on a pool of its own, neither run
    /// inside the other's wait).
    #[test]
    fn jobs_run_on_pools_of_their_own() {
        let caller = std::thread::current().id();
        let (n, index, same) = on_pool(3, || {
            (
                rayon::current_num_threads(),
                rayon::current_thread_index(),
                std::thread::current().id() == caller,
            )
        });
        assert_eq!((n, index, same), (3, Some(0), true));
        let sums: Vec<u64> = std::thread::scope(|s| {
            let jobs: Vec<_> = (0..2u64)
                .map(|j| {
                    s.spawn(move || {
                        on_pool(2, || {
                            use rayon::prelude::*;
                            (0..200_000u64).into_par_iter().map(|i| i % 7 + j).sum()
                        })
                    })
                })
                .collect();
            jobs.into_iter().map(|h| h.join().expect("job")).collect()
        });
        let want = |j: u64| (0..200_000u64).map(|i| i % 7 + j).sum::<u64>();
        assert_eq!(sums, vec![want(0), want(1)]);
    }

    #[test]
    fn workers_split_the_cores_of_their_node() {
        assert_eq!(thread_count(0, 1, 16), 16);
        assert_eq!(thread_count(0, 2, 16), 8);
        assert_eq!(thread_count(0, 3, 2), 1, "never zero");
        assert_eq!(thread_count(4, 8, 2), 4, "train.threads wins");
    }
}
