//! Issue 5: a QLoRA run (`peft.method = "qlora"`) on a 4-bit base trains, its loss falls, and it
//! exports a PEFT adapter that loads on the quantized and on the unquantized base.

use std::path::Path;

use bellows_models::{load_pretrained_with_adapter, CausalLm};
use bellows_tests::golden;
use bellows_trainer::{evaluate_dir, train, EvalOptions, RunConfig};
use burn::backend::Flex;

fn rows(path: &Path) {
    let mut text = String::new();
    for r in 0..16u32 {
        let ids: Vec<String> = (0..16u32)
            .map(|t| (3 + (r * 7 + t * 5) % 90).to_string())
            .collect();
        text.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(",")));
    }
    std::fs::write(path, text).expect("write data");
}

fn job(out: &Path, data: &Path, peft: &str) -> RunConfig {
    let text = format!(
        r#"
[run]
output_dir = "{out}"
max_steps = 30
log_every = 10
[model]
path = "{base}"
[data]
train = "{data}"
seq_len = 16
batch_size = 8
shuffle = "off"
[optim]
lr = 1e-2
warmup_steps = 0
[logging]
progress = "quiet"
tensorboard = false
{peft}
"#,
        out = out.display(),
        base = golden("llama_gqa").display(),
        data = data.display(),
    );
    RunConfig::from_toml_str(&text, Path::new("qlora.toml"), &[]).unwrap_or_else(|e| panic!("{e}"))
}

const QLORA: &str = r#"
[peft]
method = "qlora"
r = 8
alpha = 16.0
target_modules = "all-linear"
[peft.quantization]
block_size = 64
double_quant = true
"#;

#[test]
fn qlora_training_lowers_the_loss_and_exports_a_peft_adapter() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("rows.jsonl");
    rows(&data);
    let out = tmp.path().join("run");
    let report = train(&job(&out, &data, QLORA)).expect("qlora run");
    assert_eq!(report.steps, 30);
    assert!(
        report.final_loss < 0.7 * report.first_loss,
        "loss {} -> {}",
        report.first_loss,
        report.final_loss
    );
    // A normal PEFT adapter: LoRA type, r 8, all seven linears, no quantization leftovers.
    let adapter = out.join("adapter");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    // It lowers the eval loss of the quantized base, and loads on the unquantized base too.
    let opts = |quantize| EvalOptions {
        batch_size: 8,
        max_rows: None,
        seq_len: 16,
        quantize,
    };
    let q = Some(bellows_peft::Nf4Options::default());
    let base = evaluate_dir(&golden("llama_gqa"), None, &data, &opts(q)).expect("base");
    let tuned = evaluate_dir(&golden("llama_gqa"), Some(&adapter), &data, &opts(q)).expect("tuned");
    assert!(
        tuned.loss < 0.7 * base.loss,
        "{} -> {}",
        base.loss,
        tuned.loss
    );
    let dense = evaluate_dir(&golden("llama_gqa"), Some(&adapter), &data, &opts(None))
        .expect("adapter on the f32 base");
    assert!(
        dense.loss < 0.8 * base.loss,
        "f32 base + adapter: {}",
        dense.loss
    );
    let dev = Default::default();
    let (_, _, m): (_, _, CausalLm<Flex>) =
        load_pretrained_with_adapter(&golden("llama_gqa"), &adapter, &dev).expect("load");
    assert!(!m.is_quantized() && m.model.layers[1].mlp.down_proj.lora.is_some());
    // The resolved config keeps the quantization section and is itself a valid job.
    let saved = RunConfig::load(&out.join("config.toml"), &[]).expect("saved config is valid");
    assert_eq!(saved.peft.quantization.map(|q| q.block_size), Some(64));
}

#[test]
fn invalid_quantization_settings_name_their_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("rows.jsonl");
    let text = |peft: &str| {
        format!(
            "[run]\noutput_dir = \"{}\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n{peft}",
            tmp.path().display(),
            golden("llama_gqa").display(),
            data.display()
        )
    };
    let err = |peft: &str| {
        RunConfig::from_toml_str(&text(peft), Path::new("x.toml"), &[])
            .expect_err("invalid")
            .to_string()
    };
    let e = err("[peft]\nmethod = \"qlora\"\n[peft.quantization]\nblock_size = 48\n");
    assert!(
        e.contains("peft.quantization.block_size") && e.contains("48"),
        "{e}"
    );
    let e = err("[peft]\nmethod = \"lora\"\n[peft.quantization]\nblock_size = 64\n");
    assert!(
        e.contains("peft.quantization") && e.contains("qlora"),
        "{e}"
    );
    let e = err("[peft]\nmethod = \"qlora\"\n[peft.quantization]\ntype = \"fp4\"\n");
    assert!(e.contains("fp4") || e.contains("type"), "{e}");
}

/// QLoRA with bf16 compute (mixed precision): the NF4 weight is dequantized straight into the
/// matmul dtype; the run trains like the f32 one.
#[test]
fn qlora_with_bf16_compute_lowers_the_loss() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("rows.jsonl");
    rows(&data);
    let peft = format!("{QLORA}[train]\nprecision = \"bf16\"\n");
    let report = train(&job(&tmp.path().join("run"), &data, &peft)).expect("bf16 qlora run");
    assert!(
        report.final_loss < 0.7 * report.first_loss,
        "loss {} -> {}",
        report.first_loss,
        report.final_loss
    );
}
