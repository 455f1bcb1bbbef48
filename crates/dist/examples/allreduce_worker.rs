//! A tiny worker for `bellows launch`: joins the group from the environment, all-reduces a vector and
//! writes the result to `<out>/rank<N>.txt`.
//!
//! Run: `cargo run -p bellows-dist --example launch -- 2 target/debug/examples/allreduce_worker --out /tmp/ar`
//!
//! Flags: `--out DIR` (required), `--len N` (default 1000), `--timeout-secs S` (default 30),
//! `--fail-rank R` (that rank exits with code 3 before joining), `--fail-attempts K` (fail only on the
//! first K attempts, read from `BELLOWS_RESTART_COUNT`).

use std::error::Error;
use std::path::PathBuf;

use bellows_dist::{DistConfig, DistEnv, ProcessGroup, ReduceOp};

fn main() {
    if let Err(e) = worker() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn worker() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out = PathBuf::from(flag("--out").ok_or("--out DIR is required")?);
    let len: usize = flag("--len")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let timeout_secs: u64 = flag("--timeout-secs")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(30);
    let fail_rank: Option<usize> = flag("--fail-rank").map(|s| s.parse()).transpose()?;
    let fail_attempts: usize = flag("--fail-attempts")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(usize::MAX);
    let attempt: usize = std::env::var("BELLOWS_RESTART_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);

    let env = DistEnv::from_env()?;
    // Failing before joining leaves the other ranks waiting in init: the launcher has to stop them.
    if fail_rank == Some(env.rank) && attempt < fail_attempts {
        eprintln!("failing on purpose");
        std::process::exit(3);
    }
    let cfg = DistConfig {
        timeout_secs,
        backend: bellows_dist::BackendKind::Cpu,
        ..DistConfig::default()
    };
    let pg = ProcessGroup::init(&env, &cfg, "allreduce-worker")?;
    println!(
        "joined as rank {} of {} (attempt {attempt})",
        pg.rank(),
        pg.world_size()
    );
    let mut v: Vec<f64> = (0..len).map(|i| (i + pg.rank() + 1) as f64).collect();
    pg.all_reduce(&mut v, ReduceOp::Sum)?;
    let text: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    std::fs::write(out.join(format!("rank{}.txt", pg.rank())), text.join("\n"))?;
    pg.barrier()?;
    Ok(())
}
