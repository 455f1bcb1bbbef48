//! Process faults through the real binary (issue #12): a rank killed or hung (SIGSTOP) stops the
//! whole launch within 30 s with the failed rank named, and a full disk while checkpointing is a
//! clear error that leaves the previous checkpoint intact and resumable.
//! SIGTERM (checkpoint + exit 0) is proven in `resume.rs`, restarts in `ddp.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bellows() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bellows"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// A tiny model on the quickstart data; `extra` is appended TOML.
fn job(dir: &Path, extra: &str) -> PathBuf {
    let data = root().join("configs/data/quickstart-train.parquet");
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[run]
seed = 5
max_steps = 100000
log_every = 1
[model.init]
vocab_size = 256
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 4
[data]
train = "{data}"
seq_len = 16
batch_size = 2
[logging]
progress = "plain"
tensorboard = false
{extra}
"#,
            data = data.display()
        ),
    )
    .expect("write job");
    path
}

/// Starts `bellows launch --nproc-per-node 2` with a 5 s collective timeout and waits until
/// training runs (rank 0 has logged a step).
fn launch_two(dir: &Path) -> Child {
    let cfg = job(dir, "[dist]\ntimeout_secs = 5\n");
    let out = dir.join("out");
    let child = bellows()
        .arg("launch")
        .args(["--nproc-per-node", "2", "--stop-grace-secs", "2"])
        .arg(&cfg)
        .args(["--set", &format!("run.output_dir={}", out.display())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn launcher");
    let start = Instant::now();
    while !out.join("metrics.jsonl").is_file() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// The launcher's workers as `(rank, pid)`, the rank read from each worker's environment.
fn workers(launcher: u32) -> Vec<(usize, u32)> {
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
        .expect("children");
    let mut out: Vec<(usize, u32)> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter_map(|pid: u32| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let rank = env
                .split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"RANK="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())?;
            Some((rank, pid))
        })
        .collect();
    out.sort();
    out
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Whether `pid` still exists as a live (not zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// The local addresses (`ip:port`, hex as in `/proc/net/tcp`) of listening TCP sockets on `port`.
fn listeners(port: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default()
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let suffix = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[3] == "0A" && f[1].ends_with(&suffix)).then(|| f[1].to_string())
        })
        .collect()
}

/// Waits for the launcher; returns its output and how long it took after `since`.
fn finish(child: Child, since: Instant) -> (Output, Duration) {
    let out = child.wait_with_output().expect("launcher exits");
    (out, since.elapsed())
}

#[test]
fn a_killed_rank_stops_every_rank_within_30_s_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = launch_two(dir.path());
    let ws = workers(child.id());
    assert_eq!(ws.iter().map(|w| w.0).collect::<Vec<_>>(), [0, 1], "{ws:?}");
    // The launcher's store listens on loopback only (the single-node default), and the job token
    // it hands the workers is a fresh random one.
    let env = std::fs::read(format!("/proc/{}/environ", ws[0].1)).expect("environ");
    let var = |name: &str| -> String {
        env.split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(format!("{name}=").as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let port: u16 = var("MASTER_PORT").parse().expect("MASTER_PORT");
    assert_eq!(var("MASTER_ADDR"), "127.0.0.1");
    assert_eq!(
        listeners(port),
        ["0100007F:".to_string() + &format!("{port:04X}")]
    );
    let token = var("BELLOWS_JOB_TOKEN");
    assert!(
        token.len() == 32 && token.chars().all(|c| c.is_ascii_hexdigit()),
        "{token}"
    );
    let t = Instant::now();
    signal(ws[1].1, "-KILL");
    let (out, took) = finish(child, t);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "launcher must fail:\n{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{err}");
    assert!(
        err.contains("launch: rank 1 failed (killed by signal 9)"),
        "launcher names the killed rank:\n{err}"
    );
    for (rank, pid) in &ws {
        assert!(!alive(*pid), "rank {rank} (pid {pid}) still running");
    }
}

#[test]
fn a_hung_rank_is_named_by_the_collective_timeout_and_the_launch_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = launch_two(dir.path());
    let ws = workers(child.id());
    assert_eq!(ws.iter().map(|w| w.0).collect::<Vec<_>>(), [0, 1], "{ws:?}");
    let t = Instant::now();
    signal(ws[1].1, "-STOP"); // Alive but silent: only a timeout can notice.
    let (out, took) = finish(child, t);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "launcher must fail:\n{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{err}");
    assert!(
        err.lines().any(|l| l.starts_with("[rank 0]")
            && l.contains("on rank 0: timed out after 5.0 s waiting for rank 1")),
        "rank 0 names the hung rank:\n{err}"
    );
    assert!(err.contains("launch: rank 0 failed"), "{err}");
    for (rank, pid) in &ws {
        assert!(!alive(*pid), "rank {rank} (pid {pid}) still running");
    }
}

/// The disk fills while checkpoint 3+ is written: a real small file system (a 1.5 MiB tmpfs in a
/// private mount namespace, via `unshare`; no root needed where user namespaces are allowed).
#[test]
fn a_full_disk_while_checkpointing_is_an_error_and_the_previous_checkpoint_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(
        dir.path(),
        "[checkpoint]\nevery_steps = 1\nkeep_last = 100\n",
    );
    let mnt = dir.path().join("small");
    let kept = dir.path().join("kept");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let script = format!(
        r#"mount -t tmpfs -o size=1536k tmpfs "{mnt}" || exit 97
"{bin}" train "{cfg}" --set run.output_dir="{mnt}/out"
rc=$?
cp -a "{mnt}/out" "{kept}"
exit $rc"#,
        mnt = mnt.display(),
        bin = env!("CARGO_BIN_EXE_bellows"),
        cfg = cfg.display(),
        kept = kept.display(),
    );
    let Ok(out) = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .output()
    else {
        eprintln!("SKIPPED: no `unshare` (util-linux) on this machine");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(97) || (!out.status.success() && err.contains("unshare:")) {
        eprintln!("SKIPPED: cannot mount a tmpfs in a private namespace here:\n{err}");
        return;
    }
    assert!(
        !out.status.success(),
        "training on a full disk must fail:\n{err}"
    );
    assert!(
        err.contains("cannot write checkpoint file")
            && err.contains("No space left on device")
            && err.contains("the previous one is intact"),
        "{err}"
    );
    let ckpts = kept.join("checkpoints");
    let mut complete: Vec<u64> = std::fs::read_dir(&ckpts)
        .expect("checkpoints")
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            ckpts
                .join(&name)
                .join("manifest.json")
                .is_file()
                .then_some(step)
        })
        .collect();
    complete.sort();
    let last = *complete.last().expect("at least one checkpoint fit");
    assert_eq!(complete, (1..=last).collect::<Vec<_>>(), "{err}");
    // Resume from the last complete checkpoint on a roomy disk: hashes verify, training goes on.
    let resumed = bellows()
        .arg("train")
        .arg(&cfg)
        .args([
            "--set",
            &format!("run.output_dir={}", kept.display()),
            "--set",
            "checkpoint.resume=latest",
            "--set",
            &format!("run.max_steps={}", last + 2),
        ])
        .output()
        .expect("resume");
    let rerr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{rerr}");
    assert!(
        rerr.contains(&format!("checkpoint-{last} at step {last}")),
        "resumed from the last complete checkpoint:\n{rerr}"
    );
}
