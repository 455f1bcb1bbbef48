//! The `bellows` binary: exit codes and messages of `config check`, `config show`, `env`, and a short `train`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bellows() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bellows"));
    c.current_dir(root());
    c
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

#[test]
fn config_check_accepts_the_quickstart() {
    let out = bellows()
        .args(["config", "check", "configs/quickstart.toml"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_check_exits_2_and_prints_every_problem_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[run]\nmax_steps = 0\nbogus = 1\n[model.init]\nvocab_size = 64\n[data]\ntrain = \"x.parquet\"\n[optim]\nlr = -1.0\n",
    )
    .expect("write");
    let out = bellows()
        .arg("config")
        .arg("check")
        .arg(&bad)
        .args(["--set", "peft.r=0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    // Unknown keys are reported first (the section is re-read without them), then range checks.
    assert!(
        err.contains(&format!("{file}: run.bogus: unknown key")),
        "{err}"
    );
    let err2 = {
        std::fs::write(&bad, "[run]\nmax_steps = 0\n[model.init]\nvocab_size = 64\n[data]\ntrain = \"x.parquet\"\n[optim]\nlr = -1.0\n")
            .expect("write");
        let o = bellows()
            .arg("config")
            .arg("check")
            .arg(&bad)
            .args(["--set", "peft.r=0"])
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    for line in [
        "run.max_steps: must be >= 1",
        "optim.lr: must be > 0",
        "peft.r: must be >= 1",
    ] {
        assert!(
            err2.contains(&format!("{file}: {line}")),
            "missing {line:?} in:\n{err2}"
        );
    }
}

#[test]
fn config_show_prints_resolved_defaults_and_overrides() {
    let out = bellows()
        .args([
            "config",
            "show",
            "configs/quickstart.toml",
            "--set",
            "optim.lr=1e-4",
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let v: toml::Table = text.parse().expect("show prints TOML");
    assert_eq!(v["optim"]["lr"].as_float(), Some(1e-4));
    assert_eq!(
        v["optim"]["beta2"].as_float(),
        Some(0.999),
        "defaults are filled in"
    );
    assert_eq!(v["checkpoint"]["keep_last"].as_integer(), Some(2));
}

#[test]
fn env_reports_build_and_machine() {
    let out = bellows().arg("env").output().expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["burn"], "0.21.0");
    assert!(v["cores"].as_u64().is_some_and(|c| c >= 1));
}

#[test]
fn train_runs_the_quickstart_briefly_and_logs_plain_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bellows()
        .args([
            "train",
            "configs/quickstart.toml",
            "--set",
            "run.max_steps=3",
            "--set",
            "run.log_every=1",
        ])
        .arg("--set")
        .arg(format!("run.output_dir={}", dir.path().display()))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Not a terminal: plain log lines, one per logged step.
    assert!(err.contains("step 3/3 loss"), "{err}");
    assert!(dir.path().join("model/model.safetensors").is_file());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .count(),
        3
    );
}

#[test]
fn cuda_device_without_cuda_is_a_clear_error() {
    let out = bellows()
        .args([
            "config",
            "check",
            "configs/quickstart.toml",
            "--set",
            "train.device=cuda",
        ])
        .output()
        .expect("run");
    if cfg!(feature = "cuda") {
        return;
    }
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("train.device: this bellows was built without CUDA support"));
}

#[test]
fn plan_prints_per_rank_memory_of_each_strategy() {
    let out = bellows()
        .args([
            "plan",
            "configs/quickstart.toml",
            "--set",
            "peft.method=lora",
            "--nproc",
            "4",
            "--json",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rows = p["strategies"].as_array().expect("rows");
    let get = |s: &str, k: &str| {
        rows.iter()
            .find(|r| r["strategy"] == s)
            .and_then(|r| r[k].as_u64())
            .expect("field")
    };
    let trainable = p["params"]["trainable"].as_u64().expect("trainable");
    assert!(trainable > 0 && trainable < p["params"]["total"].as_u64().expect("total"));
    assert_eq!(get("ddp", "optimizer"), 2 * 4 * trainable);
    assert_eq!(get("zero1", "optimizer"), get("ddp", "optimizer") / 4);
    assert_eq!(get("fsdp", "weights"), get("ddp", "weights") / 4);
    // The table form names every strategy.
    let out = bellows()
        .args(["plan", "configs/quickstart.toml", "--nproc", "2"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for s in ["ddp", "zero1", "zero2", "fsdp", "comm_MiB/step"] {
        assert!(text.contains(s), "{text}");
    }
}
