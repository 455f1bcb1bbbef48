//! `bellows combine-adapters` through the real binary: the written folder equals the adapter PEFT's
//! `add_weighted_adapter(..., combination_type="linear")` saved, and PEFT loads it (issue #4).
//!
//! `tests/golden/bellows_combined/adapter` is this command's output, committed; regenerate it with
//! `BELLOWS_WRITE_GOLDEN=1 cargo test -p bellows-launch --test combine`, then run
//! `tests/golden/check_bellows_adapter.py`, which records PEFT's verdict in `peft_check.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use bellows_models::hf::WeightFiles;

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .join("tests/golden")
        .join(case)
}

fn combine(weights: &str, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bellows"))
        .arg("combine-adapters")
        .arg("--base")
        .arg("../../llama_gqa")
        .current_dir(golden("lora").join("adapter")) // so the recorded base path is ../../llama_gqa
        .arg("--adapter")
        .arg(golden("lora").join("adapter"))
        .arg("--adapter")
        .arg(golden("weighted_adapters").join("adapter_second"))
        .arg("--weights")
        .arg(weights)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run bellows")
}

fn assert_same_tensors(got: &Path, want: &Path) {
    let got = WeightFiles::open_file(&got.join("adapter_model.safetensors")).expect("ours");
    let want = WeightFiles::open_file(&want.join("adapter_model.safetensors")).expect("peft");
    let mut names: Vec<&str> = want.names().collect();
    names.sort_unstable();
    let mut ours: Vec<&str> = got.names().collect();
    ours.sort_unstable();
    assert_eq!(ours, names);
    for n in names {
        let shape = want.shape(n).expect("shape");
        let (g, w) = (
            got.read_f32(n, &shape).expect("ours"),
            want.read_f32(n, &shape).expect("peft"),
        );
        for (a, b) in g.values.iter().zip(&w.values) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{n}: {a} vs {b}");
        }
    }
}

#[test]
fn combine_adapters_writes_pefts_weighted_adapter() {
    for (weights, case) in [("0.7,0.3", "linear"), ("1,-0.5", "negative")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = combine(weights, dir.path());
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let peft = golden("weighted_adapters").join(format!("combined_{case}"));
        assert_same_tensors(dir.path(), &peft);
        let ours = bellows_peft::read_adapter_config(dir.path()).expect("config");
        assert_eq!((ours.r, ours.alpha), (4, 4.0));
    }
    let committed = golden("bellows_combined").join("adapter");
    if std::env::var_os("BELLOWS_WRITE_GOLDEN").is_some() {
        let run = combine("0.7,0.3", &committed);
        assert!(run.status.success());
    }
    assert_same_tensors(
        &committed,
        &golden("weighted_adapters").join("combined_linear"),
    );
}

#[test]
fn python_peft_loads_the_combined_adapter_with_pefts_logits() {
    let path = golden("bellows_combined").join("peft_check.json");
    let text =
        std::fs::read_to_string(&path).expect("peft_check.json (run check_bellows_adapter.py)");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let diff = v["max_abs_logit_diff"]
        .as_f64()
        .expect("max_abs_logit_diff");
    assert!(diff <= 1e-4, "{text}");
    assert_eq!(v["adapted_modules"].as_u64(), Some(6), "{text}");
}

#[test]
fn combine_adapters_refuses_mismatched_weights_and_dora() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = combine("0.7", dir.path());
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("2 adapters but 1 weights"));
    let run = Command::new(env!("CARGO_BIN_EXE_bellows"))
        .args(["combine-adapters", "--base"])
        .arg(golden("llama_gqa"))
        .arg("--adapter")
        .arg(golden("dora").join("adapter"))
        .args(["--weights", "1", "--out"])
        .arg(dir.path())
        .output()
        .expect("run bellows");
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("DoRA"));
}
