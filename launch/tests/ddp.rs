//! `bellows launch` data parallelism through real OS processes on loopback (CPU ring backend):
//! N processes with batch b end with the same adapter as one process with batch N·b.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{
    assert_same_adapter, assert_same_model, bellows, check, job, launch, resume_part,
    whole_and_stopped_at_2, worker_pids,
};

fn single(cfg: &Path, out: &Path, batch: usize) {
    let o = bellows()
        .arg("train")
        .arg(cfg)
        .args([
            "--set",
            &format!("data.batch_size={batch}"),
            "--set",
            &format!("run.output_dir={}", out.display()),
        ])
        .output()
        .expect("run");
    check(&o, "single-process train");
}

#[test]
fn two_and_three_processes_match_one_process_with_the_combined_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(dir.path());
    single(&cfg, &dir.path().join("one8"), 8);
    let o = launch(&cfg, &dir.path().join("two"), 2, &[]);
    check(&o, "launch 2");
    // Worker output carries rank prefixes.
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("[rank 0]")
            || String::from_utf8_lossy(&o.stdout).contains("[rank 0]")
    );
    assert_same_adapter(
        &dir.path().join("two"),
        &dir.path().join("one8"),
        "2 procs x 4 vs 1 x 8",
    );

    // Gradient accumulation on top: 2 procs x batch 2 x 2 micro-steps.
    let o = launch(
        &cfg,
        &dir.path().join("two_accum"),
        2,
        &[
            "--set",
            "data.batch_size=2",
            "--set",
            "optim.grad_accum_steps=2",
        ],
    );
    check(&o, "launch 2 with accumulation");
    assert_same_adapter(
        &dir.path().join("two_accum"),
        &dir.path().join("one8"),
        "2 procs x 2 x accum 2 vs 1 x 8",
    );

    single(&cfg, &dir.path().join("one12"), 12);
    let o = launch(&cfg, &dir.path().join("three"), 3, &[]);
    check(&o, "launch 3");
    assert_same_adapter(
        &dir.path().join("three"),
        &dir.path().join("one12"),
        "3 procs x 4 vs 1 x 12",
    );
}

#[test]
fn two_single_process_nodes_match_one_node_with_two_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(dir.path());
    let o = launch(&cfg, &dir.path().join("one_node"), 2, &[]);
    check(&o, "one node x 2");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let out = dir.path().join("two_nodes");
    let node = |r: usize| {
        bellows()
            .arg("launch")
            .args([
                "--nproc-per-node",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                &r.to_string(),
            ])
            .args([
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port.to_string(),
                "--job-token",
                "t0k3n",
            ])
            .arg(&cfg)
            .args(["--set", &format!("run.output_dir={}", out.display())])
            .spawn()
            .expect("spawn node")
    };
    let mut n0 = node(0);
    let mut n1 = node(1);
    let s1 = n1.wait().expect("node 1");
    let s0 = n0.wait().expect("node 0");
    assert!(s0.success() && s1.success(), "nodes exited {s0} / {s1}");
    assert_same_adapter(
        &out,
        &dir.path().join("one_node"),
        "2 nodes x 1 vs 1 node x 2",
    );
}

#[test]
fn killing_a_worker_stops_the_launch_naming_the_rank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(dir.path());
    let out = dir.path().join("killed");
    let child = bellows()
        .arg("launch")
        .args(["--nproc-per-node", "2", "--stop-grace-secs", "2"])
        .arg(&cfg)
        .args([
            "--set",
            &format!("run.output_dir={}", out.display()),
            "--set",
            "run.max_steps=100000",
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until training runs (rank 0 writes metrics), then kill rank 1's process.
    let start = Instant::now();
    while !out.join("metrics.jsonl").is_file() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = worker_pids(child.id());
    assert_eq!(pids.len(), 2, "two workers: {pids:?}");
    let victim = pids[1];
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    let out = child.wait_with_output().expect("launcher exits");
    let took = killed_at.elapsed();
    assert!(!out.status.success(), "launcher must fail");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 1") || err.contains("rank 0"),
        "names a rank:\n{err}"
    );
}

#[test]
fn max_restarts_restarts_the_group_from_the_latest_checkpoint_and_finishes_the_same_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(dir.path());
    let steps = [
        "--set",
        "run.max_steps=40",
        "--set",
        "checkpoint.every_steps=1",
    ];
    let o = launch(&cfg, &dir.path().join("clean"), 2, &steps);
    check(&o, "uninterrupted launch");

    let out = dir.path().join("restarted");
    let child = bellows()
        .arg("launch")
        .args([
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            "--stop-grace-secs",
            "2",
        ])
        .arg(&cfg)
        .args(["--set", &format!("run.output_dir={}", out.display())])
        .args(steps)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Kill rank 1 once a few checkpoints exist; the launcher must restart the group, which resumes.
    let start = Instant::now();
    while !out.join("checkpoints").join("checkpoint-3").is_dir() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = worker_pids(child.id());
    let Some(&victim) = pids.get(1) else {
        // The run finished before we could interfere; nothing to test on this machine's speed.
        let o = child.wait_with_output().expect("wait");
        check(&o, "launch");
        return;
    };
    eprintln!("killing rank 1 (pid {victim})");
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    let o = child.wait_with_output().expect("launcher exits");
    check(&o, "launch with --max-restarts 1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("restart"),
        "the launcher reports the restart:\n{err}"
    );
    assert_same_adapter(
        &out,
        &dir.path().join("clean"),
        "restarted vs uninterrupted",
    );
}

/// `zero: rank R of N holds X bytes of optimizer state (unsharded: Y)` lines of a run.
fn zero_state_bytes(out: &Output) -> Vec<(u64, u64)> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter_map(|l| {
            let rest = l.split("holds ").nth(1)?;
            let held = rest.split_whitespace().next()?.parse().ok()?;
            let full = rest
                .split("unsharded: ")
                .nth(1)?
                .trim_end_matches(')')
                .parse()
                .ok()?;
            Some((held, full))
        })
        .collect()
}

#[test]
fn zero1_and_zero2_match_ddp_and_shard_the_optimizer_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(dir.path());
    for nproc in [2usize, 3] {
        let ddp = dir.path().join(format!("ddp{nproc}"));
        check(&launch(&cfg, &ddp, nproc, &[]), "ddp");
        for s in ["zero1", "zero2"] {
            let out = dir.path().join(format!("{s}-{nproc}"));
            let o = launch(&cfg, &out, nproc, &["--set", &format!("dist.strategy={s}")]);
            check(&o, s);
            assert_same_adapter(&out, &ddp, &format!("{s} x {nproc} vs ddp"));
            // Each rank holds about 1/N of the AdamW moments.
            let held = zero_state_bytes(&o);
            assert_eq!(held.len(), nproc, "one line per rank");
            let total: u64 = held.iter().map(|h| h.0).sum();
            assert_eq!(total, held[0].1, "shards add up to the whole state");
            for (h, full) in &held {
                assert!(
                    *h <= full / nproc as u64 + full / 8,
                    "{s}: {h} of {full} on one rank"
                );
            }
        }
    }
    // Full fine-tuning (2-D and 1-D parameters) with ZeRO-2 on 3 processes.
    let full_ddp = dir.path().join("full-ddp");
    check(
        &launch(&cfg, &full_ddp, 3, &["--set", "peft.method=none"]),
        "full ddp",
    );
    let full_z2 = dir.path().join("full-z2");
    let o = launch(
        &cfg,
        &full_z2,
        3,
        &["--set", "peft.method=none", "--set", "dist.strategy=zero2"],
    );
    check(&o, "full zero2");
    assert_same_model(&full_z2, &full_ddp, "full zero2 x 3 vs ddp");
}

#[test]
fn a_zero_checkpoint_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(dir.path());
    let z = ["--set", "dist.strategy=zero1"];
    // Stop after step 2 (its checkpoint), then resume to step 4.
    let (whole, part) = whole_and_stopped_at_2(&cfg, dir.path(), 2, &z, "zero1");
    resume_part(&cfg, &part, 2, &z, "zero1");
    assert_same_adapter(&part, &whole, "resumed zero1 vs uninterrupted");
    // The checkpoint holds the whole (gathered) optimizer state, in the DDP format.
    let opt = std::fs::read(whole.join("checkpoints/checkpoint-4/optimizer.safetensors"))
        .expect("optimizer file");
    let st = safetensors::SafeTensors::deserialize(&opt).expect("st");
    assert!(st.names().iter().any(|n| n.ends_with(".exp_avg_sq")));
}

/// Issue 5: QLoRA data parallelism — every rank quantizes the same base, adapters sync as LoRA's.
#[test]
fn qlora_two_processes_match_one_process_with_the_combined_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(dir.path());
    let qlora = ["--set", "peft.method=\"qlora\""];
    let one = dir.path().join("one8");
    let o = bellows()
        .arg("train")
        .arg(&cfg)
        .args(["--set", "data.batch_size=8", "--set"])
        .arg(format!("run.output_dir={}", one.display()))
        .args(qlora)
        .output()
        .expect("run");
    check(&o, "single-process qlora train");
    let o = launch(&cfg, &dir.path().join("two"), 2, &qlora);
    check(&o, "qlora launch 2");
    assert_same_adapter(&dir.path().join("two"), &one, "qlora 2 procs x 4 vs 1 x 8");
}
