//! One attempt: spawn the workers, relay their output, watch them, stop them.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{signals, LaunchOptions};
use crate::error::{Error, Result};

/// How often workers are polled.
const POLL: Duration = Duration::from_millis(20);

pub(crate) enum Outcome {
    Success,
    Failed { rank: usize, status: String },
    Interrupted(i32),
}

struct Worker {
    rank: usize,
    pid: u32,
    /// `Some` once exited (`Some(None)` if waiting on it failed).
    status: Option<Option<ExitStatus>>,
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// Copies `from` to `to` line by line, each line prefixed with `[rank N] ` and written with one call
/// (ending with a newline even if the worker's last line had none).
fn prefix_lines(rank: usize, from: impl Read, mut to: impl FnMut(&[u8])) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    let prefix = format!("[rank {rank}] ");
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                let mut out = Vec::with_capacity(prefix.len() + line.len());
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(&line);
                to(&out);
            }
        }
    }
}

/// Relays a worker's stdout or stderr to ours on a thread; whole lines under the lock, so lines from
/// different ranks never interleave.
fn relay(
    rank: usize,
    from: impl Read + Send + 'static,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        prefix_lines(rank, from, |line| {
            let _ = if to_stderr {
                std::io::stderr().lock().write_all(line)
            } else {
                std::io::stdout().lock().write_all(line)
            };
        })
    })
}

fn spawn(
    opts: &LaunchOptions,
    token: &str,
    port: u16,
    attempt: usize,
    local_rank: usize,
) -> Result<(Child, Vec<std::thread::JoinHandle<()>>)> {
    let rank = opts.node_rank * opts.nproc_per_node + local_rank;
    let mut cmd = Command::new(&opts.program);
    cmd.args(&opts.args)
        .env("RANK", rank.to_string())
        .env(
            "WORLD_SIZE",
            (opts.nnodes * opts.nproc_per_node).to_string(),
        )
        .env("LOCAL_RANK", local_rank.to_string())
        .env("LOCAL_WORLD_SIZE", opts.nproc_per_node.to_string())
        .env("NODE_RANK", opts.node_rank.to_string())
        .env("GROUP_RANK", opts.node_rank.to_string())
        .env("MASTER_ADDR", opts.master_addr.trim_matches(['[', ']']))
        .env("MASTER_PORT", port.to_string())
        .env("BELLOWS_JOB_TOKEN", token)
        .env("BELLOWS_RESTART_COUNT", attempt.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if opts.nproc_per_node > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
        cmd.env("OMP_NUM_THREADS", "1");
    }
    #[cfg(feature = "cuda")]
    if let Ok(Some(dir)) = crate::nccl::loader_dir() {
        let mut paths = vec![dir];
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            paths.extend(std::env::split_paths(&old));
        }
        if let Ok(joined) = std::env::join_paths(paths) {
            cmd.env("LD_LIBRARY_PATH", joined);
        }
    }
    let mut child = cmd.spawn().map_err(|e| Error::Launch {
        message: format!(
            "cannot start {} for rank {rank}: {e}",
            opts.program.display()
        ),
    })?;
    let mut relays = Vec::new();
    if let Some(out) = child.stdout.take() {
        relays.push(relay(rank, out, false));
    }
    if let Some(err) = child.stderr.take() {
        relays.push(relay(rank, err, true));
    }
    Ok((child, relays))
}

/// Runs one attempt of the whole group on this node.
pub(crate) fn run_attempt(
    opts: &LaunchOptions,
    token: &str,
    port: u16,
    attempt: usize,
) -> Result<Outcome> {
    let (tx, exits) = mpsc::channel();
    let mut workers = Vec::new();
    let mut relays = Vec::new();
    for local_rank in 0..opts.nproc_per_node {
        let rank = opts.node_rank * opts.nproc_per_node + local_rank;
        match spawn(opts, token, port, attempt, local_rank) {
            Ok((mut child, r)) => {
                workers.push(Worker {
                    rank,
                    pid: child.id(),
                    status: None,
                });
                relays.extend(r);
                // One waiter per worker, so exits are seen in the order they happen.
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let status = child.wait();
                    let _ = tx.send((rank, status.ok()));
                });
            }
            Err(e) => {
                stop_all(&mut workers, &exits, opts.stop_grace);
                return Err(e);
            }
        }
    }
    let outcome = watch(&mut workers, &exits, opts.stop_grace);
    // Let the relays print the workers' last lines (bounded: a grandchild may still hold a pipe).
    let deadline = Instant::now() + Duration::from_secs(2);
    for r in relays {
        while !r.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if r.is_finished() {
            let _ = r.join();
        }
    }
    Ok(outcome)
}

type Exits = Receiver<(usize, Option<ExitStatus>)>;

/// Records one exit; returns a failure description if it was unsuccessful.
fn record(workers: &mut [Worker], rank: usize, status: Option<ExitStatus>) -> Option<String> {
    let w = workers.iter_mut().find(|w| w.rank == rank)?;
    w.status = Some(status);
    match status {
        Some(st) if st.success() => None,
        Some(st) => Some(describe(st)),
        None => Some("wait failed".into()),
    }
}

fn watch(workers: &mut [Worker], exits: &Exits, grace: Duration) -> Outcome {
    loop {
        if let Some(sig) = signals::take() {
            for w in workers.iter().filter(|w| w.status.is_none()) {
                signals::send_to_group(w.pid, sig);
            }
            wait_or_kill(workers, exits, grace);
            return Outcome::Interrupted(sig);
        }
        match exits.recv_timeout(POLL) {
            Ok((rank, status)) => {
                if let Some(status) = record(workers, rank, status) {
                    stop_all(workers, exits, grace);
                    return Outcome::Failed { rank, status };
                }
                if workers.iter().all(|w| w.status.is_some()) {
                    return Outcome::Success;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Outcome::Success,
        }
    }
}

/// SIGTERM to every live worker's group, then SIGKILL after `grace`.
fn stop_all(workers: &mut [Worker], exits: &Exits, grace: Duration) {
    for w in workers.iter().filter(|w| w.status.is_none()) {
        signals::send_to_group(w.pid, signals::TERM);
    }
    wait_or_kill(workers, exits, grace);
}

fn wait_or_kill(workers: &mut [Worker], exits: &Exits, grace: Duration) {
    let deadline = Instant::now() + grace;
    let mut killed = false;
    while workers.iter().any(|w| w.status.is_none()) {
        let now = Instant::now();
        if now >= deadline && !killed {
            for w in workers.iter().filter(|w| w.status.is_none()) {
                signals::send_to_group(w.pid, signals::KILL);
            }
            killed = true;
        }
        let wait = if killed {
            Duration::from_secs(5)
        } else {
            deadline - now
        };
        match exits.recv_timeout(wait) {
            Ok((rank, status)) => {
                record(workers, rank, status);
            }
            Err(RecvTimeoutError::Timeout) if !killed => {}
            // SIGKILL could not end it within 5 s, or every waiter is gone: give up waiting.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_gets_the_rank_prefix() {
        let mut out = Vec::new();
        prefix_lines(3, &b"one\ntwo\n\xffbinary\nlast"[..], |l| {
            out.extend_from_slice(l)
        });
        assert_eq!(
            out,
            b"[rank 3] one\n[rank 3] two\n[rank 3] \xffbinary\n[rank 3] last\n"
        );
    }
}
