//! Mixed precision on the CPU backend: bf16 and fp16 (with dynamic loss scaling) track f32,
//! pure-bf16 weights train and resume exactly, the loss scaler's state survives a resume, and
//! non-finite steps follow `train.on_nonfinite`.

use std::path::Path;

use bellows_tests::repo_root;
use bellows_trainer::{train, Error, RunConfig, TrainReport};

fn job(out: &Path, steps: u64, extra: &str) -> RunConfig {
    let root = repo_root();
    let text = format!(
        r#"
[run]
output_dir = "{out}"
seed = 11
max_steps = {steps}
log_every = 10
[model.init]
vocab_size = 256
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
[data]
train = "{data}"
seq_len = 32
batch_size = 8
[optim]
lr = 5e-3
warmup_steps = 5
[logging]
progress = "quiet"
tensorboard = false
{extra}
"#,
        out = out.display(),
        data = root.join("configs/data/quickstart-train.parquet").display(),
    );
    RunConfig::from_toml_str(&text, Path::new("test.toml"), &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn run(steps: u64, extra: &str) -> TrainReport {
    let dir = tempfile::tempdir().expect("tempdir");
    train(&job(dir.path(), steps, extra)).unwrap_or_else(|e| panic!("{extra}: {e}"))
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

#[test]
fn bf16_and_fp16_track_f32() {
    let f32 = run(40, "");
    let bf16 = run(40, "[train]\nprecision = \"bf16\"");
    let fp16 = run(40, "[train]\nprecision = \"fp16\"");
    assert!(f32.final_loss < f32.first_loss - 1.0, "{:?}", f32.losses);
    for (name, r, tol) in [("bf16", &bf16, 0.05), ("fp16", &fp16, 0.02)] {
        let d = max_rel_diff(&r.losses, &f32.losses);
        assert!(d <= tol, "{name}: max relative loss difference {d} > {tol}");
        // ... and it is really computed in low precision: the curves are not identical.
        assert!(d > 0.0, "{name} gave bit-identical losses to f32");
        assert!(r.final_loss < r.first_loss - 1.0, "{name}: {:?}", r.losses);
    }
    assert_eq!(f32.loss_scale, None);
    assert_eq!(bf16.loss_scale, None);
    // No overflow on this run at the default scale 65536: the scale is untouched.
    assert_eq!(fp16.loss_scale, Some(65536.0));
    assert_eq!(fp16.skipped_steps, 0);
}

#[test]
fn fp16_overflow_is_skipped_and_backs_off() {
    // A start scale of 2^40 overflows f16 (max 65504) in the backward pass: the first steps
    // are skipped and the scale halves each time until gradients fit, then training proceeds.
    let init = 2f64.powi(40);
    let r = run(
        60,
        &format!("[train]\nprecision = \"fp16\"\n[train.loss_scale]\ninit = {init:?}\ngrowth_interval = 1000"),
    );
    assert!(r.skipped_steps >= 5, "skipped {}", r.skipped_steps);
    let scale = r.loss_scale.expect("fp16 has a scale");
    assert_eq!(scale, init * 0.5f64.powi(r.skipped_steps as i32));
    let after = &r.losses[r.skipped_steps as usize..];
    assert!(
        after.last().expect("steps") < &(after[0] - 0.5),
        "skipped {}: {:?}",
        r.skipped_steps,
        r.losses
    );
}

#[test]
fn pure_bf16_trains_and_resumes_exactly() {
    let extra =
        "[train]\nprecision = \"bf16\"\nparam_dtype = \"bf16\"\n[checkpoint]\nevery_steps = 10";
    let dir = tempfile::tempdir().expect("tempdir");
    let full = train(&job(dir.path(), 20, extra)).expect("pure bf16 run");
    assert!(full.final_loss < full.first_loss - 0.5, "{:?}", full.losses);
    let dtypes =
        std::fs::read_to_string(dir.path().join("checkpoints/checkpoint-10/manifest.json"))
            .expect("manifest");
    assert!(
        dtypes.contains("bf16"),
        "checkpoint should hold bf16 tensors: {dtypes}"
    );
    // Resume a copy of the run from step 10: the same losses, bit for bit.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let ck = dir2.path().join("checkpoints");
    std::fs::create_dir_all(&ck).expect("mkdir");
    copy_dir(
        &dir.path().join("checkpoints/checkpoint-10"),
        &ck.join("checkpoint-10"),
    );
    let resumed = train(&job(
        dir2.path(),
        20,
        &format!("{extra}\nresume = \"latest\""),
    ))
    .expect("resume");
    assert_eq!(resumed.losses, full.losses);
}

#[test]
fn fp16_loss_scaler_state_survives_a_resume() {
    let extra = "[train]\nprecision = \"fp16\"\n[train.loss_scale]\ngrowth_interval = 3\n[checkpoint]\nevery_steps = 10";
    let dir = tempfile::tempdir().expect("tempdir");
    let full = train(&job(dir.path(), 20, extra)).expect("fp16 run");
    let dir2 = tempfile::tempdir().expect("tempdir");
    let ck = dir2.path().join("checkpoints");
    std::fs::create_dir_all(&ck).expect("mkdir");
    copy_dir(
        &dir.path().join("checkpoints/checkpoint-10"),
        &ck.join("checkpoint-10"),
    );
    let manifest =
        std::fs::read_to_string(ck.join("checkpoint-10/manifest.json")).expect("manifest");
    assert!(manifest.contains("\"loss_scaler\""), "{manifest}");
    let resumed = train(&job(
        dir2.path(),
        20,
        &format!("{extra}\nresume = \"latest\""),
    ))
    .expect("resume");
    assert_eq!(resumed.losses, full.losses);
    // The scale grew every 3 clean steps; a resumed run continues the same schedule.
    assert_eq!(resumed.loss_scale, full.loss_scale);
    assert!(full.loss_scale.expect("scale") > 65536.0);
}

const BLOW_UP: &str = "[optim]\nlr = 1e30\nmax_grad_norm = 0.0\nwarmup_steps = 0";

fn blow_up(out: &Path, policy: &str) -> Result<TrainReport, Error> {
    let base = job(out, 8, &format!("[train]\non_nonfinite = \"{policy}\"")).to_toml();
    let text = merge(&base, BLOW_UP);
    let cfg = RunConfig::from_toml_str(&text, Path::new("job.toml"), &[]).expect("valid job");
    train(&cfg)
}

#[test]
fn nonfinite_steps_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = blow_up(dir.path(), "skip").expect("skip policy finishes");
    assert!(r.skipped_steps >= 1, "{:?}", r.losses);
    assert!(r.losses.iter().any(|l| !l.is_finite()), "{:?}", r.losses);
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
    assert!(metrics.contains("\"skipped_steps\":"), "{metrics}");
}

#[test]
fn nonfinite_stop_writes_a_checkpoint_and_names_the_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = blow_up(dir.path(), "stop").expect_err("stop policy stops");
    let Error::NonFinite {
        step, checkpoint, ..
    } = &e
    else {
        panic!("wrong error: {e}");
    };
    assert!(*step >= 2, "{e}");
    assert!(checkpoint.join("manifest.json").is_file(), "{e}");
    assert!(e.to_string().contains(&format!("step {step}")), "{e}");
    // The checkpoint (with a non-finite loss in its history) is readable for a post-mortem.
    let m = std::fs::read_to_string(checkpoint.join("manifest.json")).expect("manifest");
    assert!(m.contains("null"), "{m}");
}

#[test]
fn precision_options_are_validated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = repo_root();
    let base = job(dir.path(), 1, "").to_toml();
    let _ = root;
    for (extra, key) in [
        ("[train]\nparam_dtype = \"bf16\"", "train.param_dtype"),
        (
            "[train]\nprecision = \"fp16\"\nparam_dtype = \"bf16\"",
            "train.param_dtype",
        ),
        (
            "[train.loss_scale]\nbackoff_factor = 2.0",
            "train.loss_scale.backoff_factor",
        ),
        (
            "[train.loss_scale]\ngrowth_factor = 1.0",
            "train.loss_scale.growth_factor",
        ),
        ("[train.loss_scale]\ninit = 0.0", "train.loss_scale.init"),
        ("[train]\nspike_factor = -1.0", "train.spike_factor"),
        ("[train]\non_nonfinite = \"ignore\"", "train.on_nonfinite"),
        ("[train]\nprecision = \"fp8\"", "train.precision"),
    ] {
        let text = merge(&base, extra);
        let e = RunConfig::from_toml_str(&text, Path::new("job.toml"), &[])
            .expect_err(extra)
            .to_string();
        assert!(e.contains(&format!("job.toml: {key}")), "{extra}: {e}");
    }
}

/// `base` with the tables of `extra` merged in (later keys win).
fn merge(base: &str, extra: &str) -> String {
    let mut b: toml::Table = base.parse().expect("base toml");
    let e: toml::Table = extra.parse().expect("extra toml");
    fn deep(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => deep(a, b),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    deep(&mut b, e);
    toml::to_string(&b).expect("toml")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}
