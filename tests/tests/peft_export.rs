//! An adapter trained and written by bellows, checked by Python PEFT.
//!
//! `tests/golden/bellows_written/` holds an adapter bellows wrote (DoRA + rsLoRA on all linears,
//! with `rank_pattern` / `alpha_pattern`, 5 AdamW steps on the `llama_gqa` inputs) and bellows'
//! logits with it. `tests/golden/check_bellows_adapter.py` loads that folder with PEFT and records
//! PEFT's logits difference in `peft_check.json`. These tests (1) re-create the adapter and check
//! the committed files are what bellows writes today, and (2) check PEFT's recorded verdict.
//!
//! To regenerate: `BELLOWS_WRITE_GOLDEN=1 cargo test -p bellows-tests --test peft_export`, then
//! `tests/golden/.venv/bin/python tests/golden/check_bellows_adapter.py`.

use std::collections::BTreeMap;
use std::path::Path;

use bellows_models::hf::write_safetensors;
use bellows_models::{
    causal_lm_loss_sum, is_adapter_path, load_pretrained_with, save_adapter, CausalLm,
    ForwardInput, TrainableMapper,
};
use bellows_peft::{InitRng, LoraInit, Method, PeftConfig, TargetModules};
use bellows_tests::{assert_close, golden, read_array};
use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

type AB = Autodiff<Flex>;

fn peft_config() -> PeftConfig {
    PeftConfig {
        method: Method::Lora,
        r: 4,
        alpha: 8.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        rank_pattern: BTreeMap::from([("o_proj".into(), 2)]),
        alpha_pattern: BTreeMap::from([("v_proj".into(), 4.0)]),
        use_rslora: true,
        use_dora: true,
        init: LoraInit::Gaussian,
        ..PeftConfig::default()
    }
}

fn logits<Bk: Backend>(model: &CausalLm<Bk>, ids: &[i64], b: usize, s: usize) -> Tensor<Bk, 3> {
    let dev = Default::default();
    let t = Tensor::<Bk, 2, Int>::from_data(TensorData::new(ids.to_vec(), [b, s]), &dev);
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
    model.forward(
        t,
        &ForwardInput {
            positions: &positions,
            segments: None,
            compute: None,
        },
    )
}

/// Trains the adapter and writes `adapter/` and `bellows_logits.safetensors` into `dir`.
fn write_case(dir: &Path) -> Vec<f32> {
    let cfg = peft_config();
    let plan = cfg.plan().expect("plan");
    let dev = Default::default();
    let (_, model) =
        load_pretrained_with::<AB>(&golden("llama_gqa"), &plan, &mut InitRng::new(5), &dev)
            .expect("base");
    let mut model = model.map(&mut TrainableMapper::new(is_adapter_path));
    let inputs = golden("llama_gqa").join("inputs.safetensors");
    let ids = read_array(&inputs, "input_ids");
    let (b, s) = (ids.shape[0], ids.shape[1]);
    let ids: Vec<i64> = ids.values.iter().map(|&v| v as i64).collect();
    let labels: Vec<i64> = read_array(&inputs, "labels")
        .values
        .iter()
        .map(|&v| v as i64)
        .collect();
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<AB, CausalLm<AB>>();
    for _ in 0..5 {
        let l = causal_lm_loss_sum(logits(&model, &ids, b, s), &labels);
        let loss = l.sum.div_scalar(l.tokens as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    let inner = model.valid();
    save_adapter(&inner, &cfg, "../../llama_gqa", &dir.join("adapter")).expect("save");
    let out: Vec<f32> = logits(&inner, &ids, b, s)
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    write_safetensors(
        &dir.join("bellows_logits.safetensors"),
        &[(
            "logits".into(),
            vec![b, s, out.len() / (b * s)],
            out.clone(),
        )],
    )
    .expect("write logits");
    out
}

#[test]
fn committed_bellows_adapter_is_what_bellows_writes_today() {
    let committed = golden("bellows_written");
    if std::env::var_os("BELLOWS_WRITE_GOLDEN").is_some() {
        write_case(&committed);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let fresh = write_case(tmp.path());
    let fresh: Vec<f64> = fresh.into_iter().map(f64::from).collect();
    let exp = read_array(&committed.join("bellows_logits.safetensors"), "logits");
    assert_close("bellows logits", &fresh, &exp.values, 1e-5, 1e-5);
    let cfg_new: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter/adapter_config.json")).expect("cfg"),
    )
    .expect("json");
    let cfg_old: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(committed.join("adapter/adapter_config.json")).expect("cfg"),
    )
    .expect("json");
    assert_eq!(cfg_new, cfg_old);
}

#[test]
fn python_peft_loads_the_bellows_adapter_with_equal_logits() {
    let path = golden("bellows_written").join("peft_check.json");
    let text =
        std::fs::read_to_string(&path).expect("peft_check.json (run check_bellows_adapter.py)");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let diff = v["max_abs_logit_diff"]
        .as_f64()
        .expect("max_abs_logit_diff");
    assert!(
        diff <= 1e-4,
        "PEFT's logits differ from bellows' by {diff}: {text}"
    );
    assert_eq!(v["adapted_modules"].as_u64(), Some(14), "{text}");
    assert!(
        v["logit_change_vs_base"].as_f64().expect("change") > 1e-2,
        "{text}"
    );
}
