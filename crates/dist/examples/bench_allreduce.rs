//! All-reduce bus bandwidth of the CPU ring over loopback, 1 to 64 MB of f32.
//!
//! Run: `cargo run --release -p bellows-dist --example bench_allreduce -- --nproc 2`
//!
//! Without a launch environment it launches itself with `--nproc` workers through
//! `bellows_dist::launch`; rank 0 prints one line per size. Bus bandwidth follows nccl-tests:
//! `bytes * 2 (w - 1) / w / time`.

use std::error::Error;
use std::time::Instant;

use bellows_dist::launch::{run, LaunchOptions};
use bellows_dist::{BackendKind, DistConfig, DistEnv, EnvSource, ProcessGroup, ReduceOp};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let env = DistEnv::from_env()?;
    if env.source == EnvSource::Single {
        let nproc: usize = flag("--nproc").map(|s| s.parse()).transpose()?.unwrap_or(2);
        let exe = std::env::current_exe()?;
        run(&LaunchOptions::local(nproc, exe, args.clone()))?;
        return Ok(());
    }
    let cfg = DistConfig {
        backend: BackendKind::Cpu,
        timeout_secs: 120,
        ..DistConfig::default()
    };
    let pg = ProcessGroup::init(&env, &cfg, "bench")?;
    let w = pg.world_size();
    if pg.rank() == 0 {
        println!("world {w}: size_mb  time_ms  algbw_GBps  busbw_GBps");
    }
    for mb in [1usize, 4, 16, 64] {
        let n = mb * 1024 * 1024 / 4;
        let mut buf = vec![1.0f32; n];
        let iters = (256 / mb).clamp(3, 20);
        for _ in 0..2 {
            pg.all_reduce(&mut buf, ReduceOp::Sum)?;
        }
        pg.barrier()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            pg.all_reduce(&mut buf, ReduceOp::Sum)?;
        }
        let secs = t0.elapsed().as_secs_f64() / iters as f64;
        let bytes = (n * 4) as f64;
        let algbw = bytes / secs / 1e9;
        let busbw = algbw * 2.0 * (w - 1) as f64 / w as f64;
        if pg.rank() == 0 {
            println!(
                "world {w}: {mb:>7}  {:>7.2}  {algbw:>10.3}  {busbw:>10.3}",
                secs * 1e3
            );
        }
    }
    pg.barrier()?;
    Ok(())
}
