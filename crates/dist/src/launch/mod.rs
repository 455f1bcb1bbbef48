//! The library behind `bellows launch`: host the store, start one worker per local rank with the env
//! contract, prefix their output, forward signals, stop everyone when one fails, restart the group.
//!
//! # The worker environment contract
//! Every worker gets (and [`crate::DistEnv::from_env`] reads, as [`crate::EnvSource::Bellows`]):
//!
//! | variable | value |
//! |---|---|
//! | `RANK` | global rank, `node_rank * nproc_per_node + LOCAL_RANK` |
//! | `WORLD_SIZE` | `nnodes * nproc_per_node` |
//! | `LOCAL_RANK`, `LOCAL_WORLD_SIZE` | rank on this node, `nproc_per_node` |
//! | `NODE_RANK`, `GROUP_RANK` | `node_rank` (`GROUP_RANK` for torchrun-style code) |
//! | `MASTER_ADDR`, `MASTER_PORT` | where the store listens (hosted by node 0's launcher) |
//! | `BELLOWS_JOB_TOKEN` | per-job secret for the store; its presence marks a bellows launch |
//! | `BELLOWS_RESTART_COUNT` | 0 on the first attempt, then 1, 2, ... |
//! | `OMP_NUM_THREADS` | `1` when `nproc_per_node > 1` and the caller did not set it (as torchrun does) |
//! | `LD_LIBRARY_PATH` | with feature `cuda` only: prefixed with `nccl::loader_dir()` (a `libnccl.so` link) when libnccl is found |
//!
//! Each worker runs in its own process group; signals are forwarded to those groups.

mod signals;
mod supervise;

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::store::StoreServer;

/// What to launch and where.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchOptions {
    /// Workers on this node (>= 1).
    pub nproc_per_node: usize,
    /// Nodes in the job (>= 1).
    pub nnodes: usize,
    /// This node's index, `0..nnodes`; node 0 hosts the store.
    pub node_rank: usize,
    /// The store host: node 0 binds it, every worker connects to it (e.g. `127.0.0.1` for one node).
    pub master_addr: String,
    /// The store port; 0 lets node 0 pick a free one (only with `nnodes == 1`).
    pub master_port: u16,
    /// How often the whole group is restarted after a failure (0 = never). Needs `nnodes == 1`.
    pub max_restarts: usize,
    /// The worker program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The store secret; must be the same on every node. `None` generates one (only with `nnodes == 1`).
    pub job_token: Option<String>,
    /// How long workers get between SIGTERM and SIGKILL when the group is stopped. Default 5 s.
    pub stop_grace: Duration,
}

impl LaunchOptions {
    /// One node, `nproc` workers of `program` on 127.0.0.1 with a free port, no restarts.
    pub fn local(nproc: usize, program: impl Into<PathBuf>, args: Vec<String>) -> Self {
        LaunchOptions {
            nproc_per_node: nproc,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            max_restarts: 0,
            program: program.into(),
            args,
            job_token: None,
            stop_grace: Duration::from_secs(5),
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Launch { message: m });
        if self.nproc_per_node == 0 || self.nnodes == 0 {
            return bad(format!(
                "nproc_per_node ({}) and nnodes ({}) must be >= 1",
                self.nproc_per_node, self.nnodes
            ));
        }
        if self.node_rank >= self.nnodes {
            return bad(format!(
                "node_rank {} is not < nnodes {}",
                self.node_rank, self.nnodes
            ));
        }
        if self.nnodes > 1 && (self.master_port == 0 || self.job_token.is_none()) {
            return bad(
                "several nodes need an explicit master_port and job_token shared by all nodes"
                    .into(),
            );
        }
        if self.nnodes > 1 && self.max_restarts > 0 {
            return bad(
                "max_restarts > 0 is only supported with nnodes == 1 in this version".into(),
            );
        }
        Ok(())
    }
}

/// How a successful launch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchReport {
    /// Group restarts that were needed (0 if the first attempt succeeded).
    pub restarts: usize,
}

/// Runs the job on this node until every worker has exited successfully.
///
/// # Errors
/// [`Error::WorkerFailed`] naming the first rank that failed (the others are stopped within
/// `stop_grace`), after `max_restarts` restarts; [`Error::Interrupted`] when SIGINT/SIGTERM arrived (it is
/// forwarded to the workers first); [`Error::Launch`] for bad options or a program that cannot start.
pub fn run(opts: &LaunchOptions) -> Result<LaunchReport> {
    opts.check()?;
    let token = opts.job_token.clone().unwrap_or_else(random_token);
    let _catch = signals::Catch::install();
    let mut port = opts.master_port;
    let mut attempt = 0;
    loop {
        // A fresh store per attempt, so that nothing from a failed attempt leaks into the next one.
        // With `master_port == 0` every attempt gets a new free port.
        let server = if opts.node_rank == 0 {
            let s = bind_store(&opts.master_addr, opts.master_port, &token)?;
            port = s.local_addr().port();
            Some(s)
        } else {
            None
        };
        let outcome = supervise::run_attempt(opts, &token, port, attempt)?;
        drop(server);
        match outcome {
            supervise::Outcome::Success => return Ok(LaunchReport { restarts: attempt }),
            supervise::Outcome::Interrupted(signal) => return Err(Error::Interrupted { signal }),
            supervise::Outcome::Failed { rank, status } if attempt < opts.max_restarts => {
                eprintln!(
                    "[launch] rank {rank} failed ({status}); restarting the group ({} of {})",
                    attempt + 1,
                    opts.max_restarts
                );
                attempt += 1;
            }
            supervise::Outcome::Failed { rank, status } => {
                let restarts = if attempt > 0 {
                    format!(" after {attempt} restarts")
                } else {
                    String::new()
                };
                return Err(Error::WorkerFailed {
                    rank,
                    status,
                    restarts,
                });
            }
        }
    }
}

/// Binds the store, retrying a fixed port for a few seconds while the previous attempt's sockets close.
fn bind_store(host: &str, port: u16, token: &str) -> Result<StoreServer> {
    let addr = format!("{}:{port}", bracket(host));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match StoreServer::bind(&addr, token) {
            Err(Error::Io { source, .. })
                if port != 0
                    && source.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// 128 random bits from the standard library's randomly seeded hasher (no extra dependency).
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let part = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{:016x}{:016x}", part(), part())
}
