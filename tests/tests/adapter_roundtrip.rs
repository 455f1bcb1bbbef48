//! An adapter trained by bellows (`peft.method = "lora"`) is written in PEFT's format and reloads to
//! the model that was trained.

use std::path::Path;

use bellows_models::{load_adapter, CausalLm, ForwardInput};
use bellows_tests::repo_root;
use bellows_trainer::{build_model, evaluate, train, Accelerator, CpuBackend, RunConfig};
use burn::module::AutodiffModule;
use burn::tensor::{Int, Tensor, TensorData};

fn job(out: &Path, peft: &str) -> RunConfig {
    let root = repo_root();
    let text = format!(
        r#"
[run]
output_dir = "{out}"
seed = 11
max_steps = 6
log_every = 3
[model.init]
vocab_size = 256
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
[data]
train = "{train}"
eval = "{eval}"
seq_len = 16
batch_size = 4
[optim]
lr = 1e-2
[logging]
progress = "quiet"
[peft]
method = "lora"
r = 4
alpha = 8
{peft}
"#,
        out = out.display(),
        train = root.join("configs/data/quickstart-train.parquet").display(),
        eval = root.join("configs/data/quickstart-eval.parquet").display(),
    );
    RunConfig::from_toml_str(&text, Path::new("test.toml"), &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn logits(model: &CausalLm<burn::backend::Flex>) -> Vec<f32> {
    let dev = Default::default();
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 256).collect();
    let t = Tensor::<burn::backend::Flex, 2, Int>::from_data(TensorData::new(ids, [2, 12]), &dev);
    let positions: Vec<u32> = (0..2).flat_map(|_| 0..12).collect();
    let out = model.forward(
        t,
        &ForwardInput {
            positions: &positions,
            segments: None,
            compute: None,
        },
    );
    out.into_data().to_vec::<f32>().expect("f32")
}

fn round_trip(peft: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = job(dir.path(), peft);
    let report = train(&cfg).expect("train");
    let trained_eval = report.eval_loss.expect("eval split configured");
    let adapter = dir.path().join("adapter");

    // The config bellows wrote has every key the issue lists, and reads back to the job's [peft].
    let text = std::fs::read_to_string(adapter.join("adapter_config.json")).expect("config");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "base_model_name_or_path",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "init_lora_weights",
        "inference_mode",
    ] {
        assert!(
            json.get(key).is_some(),
            "adapter_config.json lacks {key}: {text}"
        );
    }
    let read = bellows_peft::read_adapter_config(&adapter).expect("readable");
    assert_eq!(read, cfg.peft);

    // Same base (seeded init), fresh adapters of the same plan, then the saved adapter on top.
    let plan = read.plan().expect("plan");
    let dev = Default::default();
    let (arch, fresh) = build_model::<CpuBackend>(&cfg, &plan, &dev).expect("model");
    let before = logits(&fresh.valid());
    let model = load_adapter(fresh, &adapter).expect("adapter loads");
    let after = logits(&model.valid());
    assert_ne!(before, after, "the trained adapter must change the logits");
    let acc = Accelerator::single();
    let eval = evaluate(&model, &cfg, &acc, arch.vocab_size, &dev)
        .expect("eval")
        .expect("eval split");
    assert!(
        (eval - trained_eval).abs() <= 1e-6 * trained_eval.abs().max(1.0),
        "reloaded eval loss {eval} vs in-memory {trained_eval}"
    );
    // Merged into the base weights, the reloaded adapter gives the same logits.
    let merged = logits(&model.valid().merge_adapters());
    for (a, b) in after.iter().zip(&merged) {
        assert!(
            (a - b).abs() <= 1e-4 + 1e-4 * b.abs(),
            "merged {b} vs adapted {a}"
        );
    }
}

#[test]
fn lora_adapter_trained_by_bellows_reloads_to_the_trained_model() {
    round_trip("");
}

#[test]
fn dora_rslora_all_linear_adapter_trained_by_bellows_reloads() {
    round_trip("use_dora = true\nuse_rslora = true\ntarget_modules = \"all-linear\"");
}

#[test]
fn modules_to_save_lm_head_is_saved_as_peft_does_and_reloads() {
    round_trip("modules_to_save = [\"lm_head\"]");
    let dir = tempfile::tempdir().expect("tempdir");
    train(&job(dir.path(), "modules_to_save = [\"lm_head\"]")).expect("train");
    let files = bellows_models::hf::WeightFiles::open_file(
        &dir.path().join("adapter/adapter_model.safetensors"),
    )
    .expect("adapter file");
    assert!(files.contains("base_model.model.lm_head.weight"));
}
