//! `bellows merge` through the real binary: the written folder holds PEFT's `merge_and_unload()` weights.

use std::path::{Path, PathBuf};
use std::process::Command;

use bellows_models::hf::WeightFiles;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn golden(case: &str) -> PathBuf {
    root().join("tests/golden").join(case)
}

fn merge(adapter: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bellows"))
        .arg("merge")
        .arg("--base")
        .arg(golden("llama_gqa"))
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run bellows")
}

fn values(files: &WeightFiles, name: &str) -> (Vec<usize>, Vec<f32>) {
    let shape = files
        .shape(name)
        .unwrap_or_else(|| panic!("{name} missing"));
    let h = files.read_f32(name, &shape).expect("tensor");
    (h.shape, h.values)
}

#[test]
fn merge_writes_peft_merged_weights_as_a_plain_hf_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("merged");
    let run = merge(&golden("dora").join("adapter"), &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.join("config.json").is_file());
    assert!(out.join("generation_config.json").is_file());
    let got = WeightFiles::open(&out).expect("merged folder");
    let base = WeightFiles::open(&golden("llama_gqa")).expect("base");
    let expected =
        WeightFiles::open_file(&golden("dora").join("merged.safetensors")).expect("golden");
    assert!(
        got.names().all(|n| !n.contains("lora")),
        "no adapter tensors in a merged model"
    );
    let mut checked = 0;
    for name in base.names() {
        let (shape, g) = values(&got, name);
        let e = if expected.contains(name) {
            checked += 1;
            expected
                .read_f32(name, &shape)
                .expect("golden tensor")
                .values
        } else {
            base.read_f32(name, &shape).expect("base tensor").values
        };
        for (a, b) in g.iter().zip(&e) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{name}: {a} vs {b}");
        }
    }
    assert_eq!(checked, 4, "q_proj and v_proj of 2 layers were merged");
}

#[test]
fn merge_names_the_missing_adapter_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = merge(&dir.path().join("nope"), &dir.path().join("out"));
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("adapter_config.json"), "{err}");
}
