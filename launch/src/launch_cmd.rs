//! `bellows launch`: runs `bellows train` in N worker processes per node, torchrun-style.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use bellows_dist::launch::{run, LaunchOptions};

/// Options of `bellows launch` (torchrun's names).
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Worker processes on this node.
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index (0 hosts the rendezvous store).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of node 0's store (every node must reach it).
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of the store; 0 picks a free one (single node only).
    #[arg(long, default_value_t = 0)]
    master_port: u16,
    /// Restart the whole group from the latest checkpoint this many times after a failure.
    #[arg(long, default_value_t = 0)]
    max_restarts: usize,
    /// Shared secret of the job's store; required with several nodes (the same on every node).
    #[arg(long)]
    job_token: Option<String>,
    /// Seconds workers get between SIGTERM and SIGKILL when the group is stopped.
    #[arg(long, default_value_t = 10)]
    stop_grace_secs: u64,
    /// The job file.
    config: PathBuf,
    /// `--set dotted.key=value` overrides passed to every worker.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// Spawns the workers and waits; exits non-zero naming the failed rank when any worker fails.
pub fn launch(a: LaunchArgs) -> ExitCode {
    // Check the job once here, so a bad file fails before any process starts.
    if let Err(issues) = bellows_trainer::RunConfig::load(&a.config, &a.set) {
        eprintln!("{issues}");
        return ExitCode::from(2);
    }
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot locate the bellows executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut args = vec!["train".to_string(), a.config.display().to_string()];
    for s in &a.set {
        args.push("--set".into());
        args.push(s.clone());
    }
    if a.max_restarts > 0 {
        // A restarted group continues from the newest checkpoint.
        args.push("--set".into());
        args.push("checkpoint.resume=latest".into());
    }
    let opts = LaunchOptions {
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        max_restarts: a.max_restarts,
        program,
        args,
        job_token: a.job_token,
        stop_grace: Duration::from_secs(a.stop_grace_secs),
    };
    match run(&opts) {
        Ok(r) => {
            if r.restarts > 0 {
                eprintln!("launch: finished after {} restart(s)", r.restarts);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("launch: {e}");
            ExitCode::FAILURE
        }
    }
}
