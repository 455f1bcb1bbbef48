//! A full model saved by bellows (`save_pretrained`) reloads in transformers with bellows' logits
//! (issue #3).
//!
//! `tests/golden/bellows_full/` holds two folders bellows wrote, with bellows' logits for each:
//! `llama/` (the `llama_gqa` model after 3 full fine-tune AdamW steps) and `qwen2_sliding/` (the
//! `qwen2_sliding_window` model re-saved: q/k/v biases and per-layer sliding windows in
//! `config.json`). `tests/golden/check_bellows_model.py` loads each with
//! `AutoModelForCausalLM.from_pretrained` and records the logits difference in `hf_check.json`.
//! These tests (1) re-create the folders and check the committed ones are what bellows writes
//! today, and (2) check transformers' recorded verdict.
//!
//! To regenerate: `BELLOWS_WRITE_GOLDEN=1 cargo test -p bellows-tests --test hf_export`, then
//! `tests/golden/.venv/bin/python tests/golden/check_bellows_model.py`.

use std::path::Path;

use bellows_models::hf::write_safetensors;
use bellows_models::{
    causal_lm_loss_sum, load_pretrained, save_pretrained, CausalLm, ForwardInput, ModelArch,
};
use bellows_peft::LoraPlan;
use bellows_tests::{assert_close, golden, read_array};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

type AB = Autodiff<Flex>;

struct Inputs {
    ids: Vec<i64>,
    labels: Vec<i64>,
    b: usize,
    s: usize,
}

fn inputs(case: &str) -> Inputs {
    let path = golden(case).join("inputs.safetensors");
    let ids = read_array(&path, "input_ids");
    let as_i64 = |v: &[f64]| v.iter().map(|&x| x as i64).collect();
    Inputs {
        b: ids.shape[0],
        s: ids.shape[1],
        ids: as_i64(&ids.values),
        labels: as_i64(&read_array(&path, "labels").values),
    }
}

fn logits<Bk: Backend>(model: &CausalLm<Bk>, inp: &Inputs) -> Tensor<Bk, 3> {
    let dev = Default::default();
    let t = Tensor::<Bk, 2, Int>::from_data(TensorData::new(inp.ids.clone(), [inp.b, inp.s]), &dev);
    let positions: Vec<u32> = (0..inp.b).flat_map(|_| 0..inp.s as u32).collect();
    model.forward(
        t,
        &ForwardInput {
            positions: &positions,
            segments: None,
            compute: None,
        },
    )
}

/// Saves `model` to `<dir>/<name>/` and its logits on `inp` to `<dir>/<name>/../<name>_logits.safetensors`.
fn save<Bk: Backend>(
    model: &CausalLm<Bk>,
    arch: &ModelArch,
    inp: &Inputs,
    dir: &Path,
    name: &str,
) -> Vec<f32> {
    save_pretrained(model, arch, &dir.join(name)).expect("save_pretrained");
    let out: Vec<f32> = logits(model, inp)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32");
    let shape = vec![inp.b, inp.s, out.len() / (inp.b * inp.s)];
    write_safetensors(
        &dir.join(format!("{name}_logits.safetensors")),
        &[("logits".into(), shape, out.clone())],
    )
    .expect("write logits");
    out
}

/// Writes both folders into `dir`; returns bellows' logits of each.
fn write_case(dir: &Path) -> [Vec<f32>; 2] {
    let dev = Default::default();
    let (arch, mut model) =
        load_pretrained::<AB>(&golden("llama_gqa"), &LoraPlan::none(), &dev).expect("llama_gqa");
    let inp = inputs("llama_gqa");
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init::<AB, CausalLm<AB>>();
    for _ in 0..3 {
        let l = causal_lm_loss_sum(logits(&model, &inp), &inp.labels);
        let loss = l.sum.div_scalar(l.tokens as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    let llama = save(&model.valid(), &arch, &inp, dir, "llama");
    let (arch, qwen) =
        load_pretrained::<Flex>(&golden("qwen2_sliding_window"), &LoraPlan::none(), &dev)
            .expect("qwen2_sliding_window");
    let qwen = save(
        &qwen,
        &arch,
        &inputs("qwen2_sliding_window"),
        dir,
        "qwen2_sliding",
    );
    [llama, qwen]
}

#[test]
fn committed_bellows_models_are_what_bellows_writes_today() {
    let committed = golden("bellows_full");
    if std::env::var_os("BELLOWS_WRITE_GOLDEN").is_some() {
        write_case(&committed);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let fresh = write_case(tmp.path());
    for (name, got) in ["llama", "qwen2_sliding"].iter().zip(fresh) {
        let got: Vec<f64> = got.into_iter().map(f64::from).collect();
        let exp = read_array(
            &committed.join(format!("{name}_logits.safetensors")),
            "logits",
        );
        assert_close(name, &got, &exp.values, 1e-5, 1e-5);
        let cfg = |d: &Path| -> serde_json::Value {
            let text = std::fs::read_to_string(d.join(name).join("config.json")).expect("config");
            serde_json::from_str(&text).expect("json")
        };
        assert_eq!(cfg(tmp.path()), cfg(&committed), "{name}");
    }
}

#[test]
fn transformers_reloads_bellows_models_with_equal_logits() {
    let path = golden("bellows_full").join("hf_check.json");
    let text = std::fs::read_to_string(&path).expect("hf_check.json (run check_bellows_model.py)");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    for name in ["llama", "qwen2_sliding"] {
        let r = &v[name];
        let diff = r["max_abs_logit_diff"]
            .as_f64()
            .expect("max_abs_logit_diff");
        assert!(
            diff <= 1e-4,
            "{name}: transformers' logits differ by {diff}: {text}"
        );
        assert_eq!(r["missing_keys"].as_u64(), Some(0), "{name}: {text}");
    }
    // The fine-tune really changed the model (so equal logits are not the base's by accident).
    let change = v["llama"]["max_abs_logit_change_vs_llama_gqa"]
        .as_f64()
        .expect("change");
    assert!(change > 1e-2, "{text}");
}
