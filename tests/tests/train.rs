//! End-to-end training through the library: the loss falls, outputs are written and readable,
//! and gradient accumulation is token-exact.

use std::path::Path;

use bellows_models::{load_pretrained, ForwardInput};
use bellows_peft::LoraPlan;
use bellows_tests::{assert_close, read_array, repo_root};
use bellows_trainer::{tensorboard::read_scalars, train, RunConfig};
use burn::backend::Flex;
use burn::tensor::{Int, Tensor};

fn tiny_job(out: &Path, data: &str, extra: &str) -> RunConfig {
    // Eval settings without eval data are a config error (issue #12), so only with eval data.
    let eval = if data.contains("eval =") {
        "eval_every = 75\neval_max_batches = 2"
    } else {
        ""
    };
    let text = format!(
        r#"
[run]
output_dir = "{out}"
seed = 7
max_steps = 150
log_every = 25
{eval}
[model.init]
vocab_size = 256
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
[data]
train = {data}
seq_len = 32
batch_size = 8
[optim]
lr = 5e-3
warmup_steps = 5
[logging]
progress = "quiet"
{extra}
"#,
        out = out.display(),
    );
    RunConfig::from_toml_str(&text, Path::new("test.toml"), &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn quickstart_data() -> String {
    let root = repo_root();
    format!(
        "\"{}\"\neval = \"{}\"",
        root.join("configs/data/quickstart-train.parquet").display(),
        root.join("configs/data/quickstart-eval.parquet").display()
    )
}

#[test]
fn loss_falls_and_outputs_are_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = tiny_job(dir.path(), &quickstart_data(), "");
    let report = train(&cfg).expect("train");
    assert_eq!(report.steps, 150);
    assert!(
        report.first_loss > 5.0,
        "starts near ln 256: {}",
        report.first_loss
    );
    assert!(
        report.final_loss < 1.39,
        "must learn context (below ln 4): {}",
        report.final_loss
    );
    let eval = report.eval_loss.expect("eval split configured");
    assert!(eval < 1.39, "eval loss {eval}");

    // metrics.jsonl: one object per logged step with the documented keys.
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let steps: Vec<u64> = rows
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, [1, 25, 50, 75, 100, 125, 150]);
    for key in ["loss", "lr", "grad_norm", "tokens_per_sec"] {
        assert!(
            rows.iter().all(|r| r[key].is_number()),
            "{key} in every row"
        );
    }
    assert!(rows[3]["eval_loss"].is_number(), "eval at step 75");

    // TensorBoard: the event file parses with valid CRCs and carries the same losses.
    let tb = std::fs::read_dir(dir.path().join("tensorboard"))
        .expect("tb dir")
        .next()
        .expect("one file")
        .expect("entry");
    let scalars = read_scalars(&tb.path()).expect("valid event file");
    let losses: Vec<(u64, f32)> = scalars
        .iter()
        .filter(|s| s.0 == "train/loss")
        .map(|s| (s.1, s.2))
        .collect();
    assert_eq!(losses.len(), 7);
    assert_eq!(losses[6], (150, report.final_loss as f32));

    // The final model is a Hugging Face folder that loads back.
    let dev = Default::default();
    let (arch, model) = load_pretrained::<Flex>(&dir.path().join("model"), &LoraPlan::none(), &dev)
        .expect("reload");
    assert_eq!(arch.hidden_size, 64);
    let ids = Tensor::<Flex, 2, Int>::from_ints([[3, 5, 7, 9]], &dev);
    let logits = model.forward(
        ids,
        &ForwardInput {
            positions: &[0, 1, 2, 3],
            segments: None,
            compute: None,
        },
    );
    assert_eq!(logits.dims(), [1, 4, 256]);
    // The resolved config is saved and is itself a valid job.
    RunConfig::load(&dir.path().join("config.toml"), &[]).expect("saved config is valid");
}

/// Rows of different lengths, so micro-batches hold different token counts: averaging per
/// micro-batch would differ from the token-weighted mean (the 2024 transformers grad-accum bug).
fn ragged_jsonl(path: &Path) {
    let mut text = String::new();
    for r in 0..64u32 {
        let len = 6 + (r * 7 % 23) as usize;
        let d = 1 + r % 4;
        let ids: Vec<String> = (0..len)
            .map(|t| ((r * 13 + t as u32 * d) % 256).to_string())
            .collect();
        text.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(",")));
    }
    std::fs::write(path, text).expect("write jsonl");
}

fn final_weights(dir: &Path) -> Vec<f64> {
    read_array(
        &dir.join("model/model.safetensors"),
        "model.layers.0.self_attn.q_proj.weight",
    )
    .values
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("ragged.jsonl");
    ragged_jsonl(&data);
    let data = format!("\"{}\"\nshuffle = \"off\"", data.display());
    let run = |name: &str, batch: usize, accum: usize| {
        let out = tmp.path().join(name);
        let mut cfg = tiny_job(&out, &data, "");
        cfg.run.max_steps = 4;
        cfg.run.eval_every = 0;
        cfg.data.seq_len = 24;
        cfg.data.batch_size = batch;
        cfg.optim.grad_accum_steps = accum;
        cfg.optim.warmup_steps = 0;
        // Adam's first steps are nearly `lr·sign(g)`: with ε = 1e-8 an element whose gradient
        // is ~1e-8 moves by an amount that hangs on its last bits, which the micro-batches' sum
        // order changes (8×1 and 4×2 parted by 1.5e-6 there once RMSNorm's row sums became lane
        // sums). ε = 1e-6 keeps such elements' steps proportional to their gradients.
        cfg.optim.eps = 1e-6;
        let r = train(&cfg).expect("train");
        (r.losses, final_weights(&out))
    };
    let (l1, w1) = run("one", 8, 1);
    let (l2, w2) = run("two", 4, 2);
    let (l4, w4) = run("four", 2, 4);
    assert_close("losses 4x2 vs 8x1", &l2, &l1, 1e-6, 1e-6);
    assert_close("losses 2x4 vs 8x1", &l4, &l1, 1e-6, 1e-6);
    assert_close("weights 4x2 vs 8x1", &w2, &w1, 1e-6, 1e-5);
    assert_close("weights 2x4 vs 8x1", &w4, &w1, 1e-6, 1e-5);
}

/// Issue 3: `model.path` starts training from a Hugging Face checkpoint (its first-step loss is the
/// checkpoint's loss on that batch) and a full fine-tune saves a folder that loads again.
#[test]
fn training_from_a_hugging_face_folder_starts_from_its_weights() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("rows.jsonl");
    let mut text = String::new();
    for r in 0..8u32 {
        let ids: Vec<String> = (0..16u32)
            .map(|t| (3 + (r * 7 + t * 5) % 90).to_string())
            .collect();
        text.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(",")));
    }
    std::fs::write(&data, text).expect("write data");
    let base = bellows_tests::golden("llama_gqa");
    let job = format!(
        r#"
[run]
output_dir = "{out}"
max_steps = 2
log_every = 1
[model]
path = "{base}"
[data]
train = "{data}"
seq_len = 16
batch_size = 8
shuffle = "off"
[optim]
lr = 1e-3
warmup_steps = 0
[logging]
progress = "quiet"
tensorboard = false
"#,
        out = tmp.path().join("run").display(),
        base = base.display(),
        data = data.display()
    );
    let cfg = RunConfig::from_toml_str(&job, Path::new("hf.toml"), &[]).expect("valid job");
    let report = train(&cfg).expect("train from the HF folder");
    let opts = bellows_trainer::EvalOptions {
        batch_size: 8,
        max_rows: None,
        seq_len: 16,
        quantize: None,
    };
    let base_loss = bellows_trainer::evaluate_dir(&base, None, &data, &opts).expect("eval base");
    assert_close(
        "first-step loss = the checkpoint's loss",
        &[report.first_loss],
        &[base_loss.loss],
        1e-5,
        1e-5,
    );
    let tuned = bellows_trainer::evaluate_dir(&tmp.path().join("run/model"), None, &data, &opts)
        .expect("eval tuned");
    assert!(
        tuned.loss < base_loss.loss,
        "fine-tuning lowers the training loss: {} -> {}",
        base_loss.loss,
        tuned.loss
    );
}
