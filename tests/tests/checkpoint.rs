//! Checkpoint integrity: corrupt, truncated and mismatched checkpoints are refused with a message
//! naming the file or the difference; leftovers of a crashed save are ignored; rotation and the
//! layout are as documented.

use std::path::Path;

use bellows_tests::repo_root;
use bellows_trainer::checkpoint::{
    latest_checkpoint, list_checkpoints, verify_checkpoint, Manifest,
};
use bellows_trainer::{train, RunConfig};

/// burn's RNG (dropout) is global to the process: tests that train run one at a time, so one
/// test's reseeding cannot interleave with another's dropout draws.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn job(out: &Path, extra: &[&str]) -> RunConfig {
    let data = repo_root().join("configs/data/quickstart-train.parquet");
    let text = format!(
        r#"
[run]
output_dir = "{out}"
seed = 5
max_steps = 4
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
[checkpoint]
every_steps = 1
keep_last = 2
[logging]
progress = "quiet"
tensorboard = false
"#,
        out = out.display(),
        data = data.display(),
    );
    let sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    RunConfig::from_toml_str(&text, Path::new("test.toml"), &sets).unwrap_or_else(|e| panic!("{e}"))
}

/// Trains 4 steps with a checkpoint every step; returns the config and the newest checkpoint.
fn trained(out: &Path) -> (RunConfig, std::path::PathBuf) {
    let cfg = job(out, &[]);
    train(&cfg).expect("train");
    let latest = latest_checkpoint(&out.join("checkpoints"))
        .expect("list")
        .expect("a checkpoint");
    (cfg, latest)
}

#[test]
fn checkpoint_layout_rotation_and_manifest_are_as_documented() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, latest) = trained(dir.path());
    let steps: Vec<u64> = list_checkpoints(&dir.path().join("checkpoints"))
        .expect("list")
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, [3, 4], "keep_last = 2");
    for f in [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "loader-rank-0.json",
        "config.toml",
        "model/model.safetensors",
        "model/config.json",
    ] {
        assert!(latest.join(f).is_file(), "{f}");
    }
    let m = Manifest::read(&latest).expect("manifest");
    assert_eq!((m.step, m.world_size, m.losses.len()), (4, 1, 4));
    assert_eq!(m.weights, "full");
    assert_eq!(m.dtypes["optimizer.safetensors"], ["f32", "i64"]);
    assert!(m.files.contains_key("model.safetensors"));
    assert!(!m.files.contains_key("manifest.json"));
    verify_checkpoint(&latest, &cfg, 1).expect("an intact checkpoint verifies");
    assert!(dir.path().join("README.md").is_file(), "model card");
    let card = std::fs::read_to_string(dir.path().join("README.md")).expect("card");
    assert!(card.contains("- Steps: 4"), "{card}");
}

#[test]
fn a_flipped_byte_is_a_hash_mismatch_naming_the_file() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, latest) = trained(dir.path());
    let f = latest.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&f).expect("read");
    let at = bytes.len() - 3;
    bytes[at] ^= 0x01;
    std::fs::write(&f, bytes).expect("write");
    let err = verify_checkpoint(&latest, &cfg, 1)
        .expect_err("corrupt")
        .to_string();
    assert!(err.contains("optimizer.safetensors"), "{err}");
    assert!(err.contains("content hash mismatch"), "{err}");
    // Resuming from it fails the same way instead of training on damaged state.
    let resume = job(
        dir.path(),
        &["checkpoint.resume=\"latest\"", "run.max_steps=6"],
    );
    let err = train(&resume).expect_err("refused").to_string();
    assert!(err.contains("content hash mismatch"), "{err}");
}

#[test]
fn a_truncated_file_is_refused_naming_the_file_and_sizes() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, latest) = trained(dir.path());
    let f = latest.join("model.safetensors");
    let bytes = std::fs::read(&f).expect("read");
    std::fs::write(&f, &bytes[..bytes.len() / 2]).expect("write");
    let err = verify_checkpoint(&latest, &cfg, 1)
        .expect_err("truncated")
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn another_config_is_refused_saying_what_differs_and_another_world_size_is_not() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, latest) = trained(dir.path());
    let other = job(
        dir.path(),
        &[
            "optim.lr=1e-3",
            "run.max_steps=9",
            "logging.progress=\"plain\"",
        ],
    );
    let err = verify_checkpoint(&latest, &other, 1)
        .expect_err("mismatch")
        .to_string();
    assert!(err.contains("optim.lr: 0.0003 -> 0.001"), "{err}");
    assert!(
        !err.contains("run.max_steps:"),
        "max_steps may change: {err}"
    );
    // Issue #9: any checkpoint resumes on another world size and strategy (the tensors are read
    // by rows, the loader is resharded).
    let same = job(dir.path(), &["run.max_steps=9"]);
    verify_checkpoint(&latest, &same, 2).expect("a ddp checkpoint resumes on 2 ranks");
    let mut sharded = same.clone();
    sharded.dist.strategy = bellows_dist::Strategy::Hybrid;
    verify_checkpoint(&latest, &sharded, 2).expect("and under hybrid sharding");
}

#[test]
fn leftovers_of_a_crashed_save_are_ignored_by_latest() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, latest) = trained(dir.path());
    let root = dir.path().join("checkpoints");
    // A save killed before its rename, and a folder without a manifest.
    std::fs::create_dir_all(root.join(".tmp-checkpoint-5")).expect("mkdir");
    std::fs::write(root.join(".tmp-checkpoint-5/model.safetensors"), b"partial").expect("write");
    std::fs::create_dir_all(root.join("checkpoint-6")).expect("mkdir");
    assert_eq!(
        latest_checkpoint(&root).expect("list"),
        Some(latest.clone())
    );
    // Resuming continues from step 4 and the next save clears the temporary folder.
    let resume = job(
        dir.path(),
        &["checkpoint.resume=\"latest\"", "run.max_steps=5"],
    );
    let report = train(&resume).expect("resume");
    assert_eq!(report.steps, 5);
    assert_eq!(report.losses.len(), 5);
    assert!(!root.join(".tmp-checkpoint-5").exists());
    let _ = cfg;
}

#[test]
fn lora_with_dropout_resumed_midway_equals_an_uninterrupted_run() {
    let _serial = serial();
    let lora = [
        "peft.method=\"lora\"",
        "peft.dropout=0.1",
        "optim.scheduler=\"constant\"",
        "checkpoint.every_steps=0",
        "run.max_steps=6",
    ];
    let a = tempfile::tempdir().expect("tempdir");
    let whole = train(&job(a.path(), &lora)).expect("uninterrupted");
    let b = tempfile::tempdir().expect("tempdir");
    let mut first = lora.to_vec();
    first.extend(["run.max_steps=3", "checkpoint.every_steps=3"]);
    train(&job(b.path(), &first)).expect("first half");
    let ckpt = b.path().join("checkpoints/checkpoint-3");
    let m = Manifest::read(&ckpt).expect("manifest");
    assert_eq!(m.weights, "trainable", "adapters only");
    assert!(ckpt.join("adapter/adapter_model.safetensors").is_file());
    let mut second = lora.to_vec();
    second.push("checkpoint.resume=\"latest\"");
    let resumed = train(&job(b.path(), &second)).expect("resumed");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&resumed.losses), bits(&whole.losses));
    let adapter =
        |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).expect("adapter");
    assert!(
        adapter(a.path()) == adapter(b.path()),
        "final adapters differ"
    );
}

/// Issue 5: a QLoRA run resumes exactly: checkpoints hold the adapters only, and the 4-bit base is
/// rebuilt (quantized again, deterministically) on resume.
#[test]
fn qlora_resumed_midway_equals_an_uninterrupted_run() {
    let _serial = serial();
    let qlora = [
        "peft.method=\"qlora\"",
        "peft.target_modules=\"all-linear\"",
        "optim.scheduler=\"constant\"",
        "checkpoint.every_steps=0",
        "run.max_steps=6",
    ];
    let a = tempfile::tempdir().expect("tempdir");
    let whole = train(&job(a.path(), &qlora)).expect("uninterrupted");
    let b = tempfile::tempdir().expect("tempdir");
    let mut first = qlora.to_vec();
    first.extend(["run.max_steps=3", "checkpoint.every_steps=3"]);
    train(&job(b.path(), &first)).expect("first half");
    let ckpt = b.path().join("checkpoints/checkpoint-3");
    assert_eq!(
        Manifest::read(&ckpt).expect("manifest").weights,
        "trainable"
    );
    let mut second = qlora.to_vec();
    second.push("checkpoint.resume=\"latest\"");
    let resumed = train(&job(b.path(), &second)).expect("resumed");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&resumed.losses), bits(&whole.losses));
    let adapter =
        |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).expect("adapter");
    assert!(
        adapter(a.path()) == adapter(b.path()),
        "final adapters differ"
    );
}

/// Issue #12: a manifest is data read from disk; a name like `../../x` or `/etc/x` must not make
/// bellows read (or later copy or delete) anything outside the checkpoint folder. Training itself
/// writes only inside `run.output_dir`.
#[test]
fn a_manifest_naming_paths_outside_its_folder_is_refused_and_training_writes_only_inside_output_dir(
) {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let (cfg, latest) = trained(&out);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["out"], "training wrote outside run.output_dir");

    std::fs::write(dir.path().join("secret"), "outside").expect("write");
    let good = std::fs::read_to_string(latest.join("manifest.json")).expect("manifest");
    let manifest: serde_json::Value = serde_json::from_str(&good).expect("json");
    for (field, name) in [
        ("files", "../../secret"),
        ("files", "/etc/hostname"),
        ("files", ""),
        ("loader_files", "../loader-rank-0.json"),
        ("dtypes", "../../secret"),
    ] {
        let mut m = manifest.clone();
        match field {
            "loader_files" => m[field] = serde_json::json!([name]),
            _ => {
                m[field][name] = if field == "files" {
                    serde_json::json!({"bytes": 7, "sha256": "00"})
                } else {
                    serde_json::json!(["f32"])
                }
            }
        }
        std::fs::write(latest.join("manifest.json"), m.to_string()).expect("write");
        let err = verify_checkpoint(&latest, &cfg, 1)
            .expect_err(name)
            .to_string();
        assert!(
            err.contains("manifest.json")
                && err.contains(field)
                && err.contains("not a relative path inside the checkpoint folder"),
            "{name}: {err}"
        );
        let resume = job(&out, &["checkpoint.resume=\"latest\"", "run.max_steps=6"]);
        let err = train(&resume).expect_err("refused").to_string();
        assert!(err.contains("not a relative path inside"), "{err}");
    }
    std::fs::write(latest.join("manifest.json"), good).expect("restore");
    verify_checkpoint(&latest, &cfg, 1).expect("the original manifest still verifies");
}
