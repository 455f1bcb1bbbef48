//! `bellows eval` and `bellows generate` through the real binary, against transformers goldens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Builder, ListBuilder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(case)
}

fn read(path: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).expect("golden file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let v = st.tensor(name).expect("tensor");
    let vals = match v.dtype() {
        safetensors::Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
            .collect(),
        safetensors::Dtype::F32 => v
            .data()
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    };
    (v.shape().to_vec(), vals)
}

fn list_column(rows: &[Vec<i64>]) -> ArrayRef {
    let mut b = ListBuilder::new(Int64Builder::new());
    for r in rows {
        b.values().append_slice(r);
        b.append(true);
    }
    Arc::new(b.finish())
}

/// The golden inputs (`input_ids`, `labels`) as a Parquet file in `dir`.
fn golden_inputs_parquet(dir: &Path) -> PathBuf {
    let inputs = golden("llama_gqa").join("inputs.safetensors");
    let (shape, ids) = read(&inputs, "input_ids");
    let (_, labels) = read(&inputs, "labels");
    let s = shape[1];
    let rows = |v: &[f64]| {
        v.chunks(s)
            .map(|r| r.iter().map(|&x| x as i64).collect())
            .collect::<Vec<Vec<i64>>>()
    };
    let list = |n: &str| {
        Field::new(
            n,
            DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
            false,
        )
    };
    let schema = Arc::new(Schema::new(vec![list("input_ids"), list("labels")]));
    let data = dir.join("eval.parquet");
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(&data).expect("create"),
        schema.clone(),
        None,
    )
    .expect("writer");
    let batch = RecordBatch::try_new(
        schema,
        vec![list_column(&rows(&ids)), list_column(&rows(&labels))],
    )
    .expect("batch");
    w.write(&batch).expect("write");
    w.close().expect("close");
    data
}

/// Runs `bellows eval --model <golden llama_gqa> --data <data> <extra...>`.
fn eval(data: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bellows"))
        .args(["eval", "--model"])
        .arg(golden("llama_gqa"))
        .arg("--data")
        .arg(data)
        .args(extra)
        .output()
        .expect("run")
}

/// The JSON report of a successful `bellows eval`.
fn report(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn eval_prints_the_transformers_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = golden_inputs_parquet(dir.path());

    let out = eval(&data, &["--batch-size", "1", "--seq-len", "16"]);
    let v = report(&out);
    let (_, expected) = read(&golden("llama_gqa").join("expected.safetensors"), "loss");
    let loss = v["loss"].as_f64().expect("loss");
    assert!(
        (loss - expected[0]).abs() <= 1e-5 * expected[0].abs(),
        "loss {loss} vs transformers {}",
        expected[0]
    );
    assert_eq!(
        v["tokens"], 25,
        "12 + 13 counted targets (see tests/golden/README.md)"
    );
    assert!((v["perplexity"].as_f64().expect("ppl") - loss.exp()).abs() < 1e-9);

    // --max-rows 1 evaluates only the first row.
    let out = eval(&data, &["--max-rows", "1", "--seq-len", "16"]);
    let v = report(&out);
    assert_eq!(v["rows"], 1);
    assert_eq!(v["tokens"], 12);

    // A row longer than --seq-len is an error naming the row, not a silent truncation.
    let out = eval(&data, &["--seq-len", "8"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("eval.parquet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn greedy_generate_prints_the_transformers_continuation() {
    let g = golden("generate").join("generate.safetensors");
    let (shape, prompt) = read(&g, "prompt_ids");
    let (nshape, new) = read(&g, "new_tokens");
    let p = shape[1];
    let n = nshape[1];
    let ids: Vec<String> = prompt[..p]
        .iter()
        .map(|&x| (x as i64).to_string())
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_bellows"))
        .args(["generate", "--model"])
        .arg(golden("llama_gqa"))
        .args([
            "--prompt-ids",
            &ids.join(","),
            "--max-new-tokens",
            &n.to_string(),
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: Vec<String> = new[..n].iter().map(|&x| (x as i64).to_string()).collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        expected.join(",")
    );
}

#[test]
fn generate_without_a_tokenizer_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_bellows"))
        .args(["generate", "--model"])
        .arg(golden("llama_gqa"))
        .args(["--prompt", "hello"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer.json") && err.contains("--prompt-ids"),
        "{err}"
    );
}

#[test]
fn eval_with_an_adapter_prints_the_peft_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = golden_inputs_parquet(dir.path());
    for case in ["lora", "dora"] {
        let out = Command::new(env!("CARGO_BIN_EXE_bellows"))
            .args(["eval", "--model"])
            .arg(golden("llama_gqa"))
            .arg("--adapter")
            .arg(golden(case).join("adapter"))
            .arg("--data")
            .arg(&data)
            .args(["--seq-len", "16"])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let (_, expected) = read(&golden(case).join("expected.safetensors"), "loss");
        let loss = v["loss"].as_f64().expect("loss");
        assert!(
            (loss - expected[0]).abs() <= 1e-5 * expected[0].abs(),
            "{case}: {loss} vs PEFT {}",
            expected[0]
        );
    }
}

fn weighted(args: &[&str], adapters: &[PathBuf], weights: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bellows"));
    c.args(args).arg("--model").arg(golden("llama_gqa"));
    for a in adapters {
        c.arg("--adapter").arg(a);
    }
    if let Some(w) = weights {
        c.args(["--adapter-weights", w]);
    }
    c.output().expect("run")
}

/// Several `--adapter`s with `--adapter-weights` equal the folder `bellows combine-adapters` wrote
/// (`tests/golden/bellows_combined`, which equals PEFT's `add_weighted_adapter`; issue #4).
#[test]
fn eval_and_generate_combine_several_adapters_with_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = golden_inputs_parquet(dir.path());
    let data = data.to_str().expect("utf-8 path");
    let two = [
        golden("lora").join("adapter"),
        golden("weighted_adapters").join("adapter_second"),
    ];
    let combined = [golden("bellows_combined").join("adapter")];
    let eval_args = ["eval", "--data", data, "--seq-len", "16"];
    let loss = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["loss"].as_f64().expect("loss")
    };
    let mixed = loss(weighted(&eval_args, &two, Some("0.7,0.3")));
    let folder = loss(weighted(&eval_args, &combined, None));
    let first = loss(weighted(&eval_args, &two[..1], None));
    assert!((mixed - folder).abs() <= 1e-6, "{mixed} vs {folder}");
    assert!(
        (mixed - first).abs() > 1e-3,
        "the combination changes the loss"
    );

    let gen_args = [
        "generate",
        "--prompt-ids",
        "5,17,42,9",
        "--max-new-tokens",
        "6",
    ];
    let a = weighted(&gen_args, &two, Some("0.7,0.3"));
    let b = weighted(&gen_args, &combined, None);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);

    let out = weighted(&gen_args, &two, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 --adapter folders but 0 --adapter-weights"),
        "{err}"
    );
}

/// The loss `bellows eval` prints for `--model <model> --data <data> <extra...>`.
fn eval_loss(model: &str, data: &Path, extra: &[&str]) -> f64 {
    let out = Command::new(env!("CARGO_BIN_EXE_bellows"))
        .args(["eval", "--model"])
        .arg(golden(model))
        .arg("--data")
        .arg(data)
        .args(["--seq-len", "16"])
        .args(extra)
        .output()
        .expect("run");
    report(&out)["loss"].as_f64().expect("loss")
}

/// Issue 5: `--quantize nf4` evaluates the 4-bit model transformers + bitsandbytes evaluate;
/// a bitsandbytes 4-bit folder loads quantized by itself; adapters go on top.
#[test]
fn eval_quantize_nf4_prints_the_bitsandbytes_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = golden_inputs_parquet(dir.path());
    let (_, bnb) = read(&golden("qlora_model").join("expected.safetensors"), "loss");
    let (_, bnb_lora) = read(&golden("qlora_lora").join("expected.safetensors"), "loss");
    let (_, f32_loss) = read(&golden("llama_gqa").join("expected.safetensors"), "loss");
    let close = |what: &str, got: f64, exp: f64, tol: f64| {
        assert!((got - exp).abs() <= tol, "{what}: {got} vs {exp}");
    };
    close(
        "bnb folder",
        eval_loss("qlora_model", &data, &[]),
        bnb[0],
        1e-5,
    );
    close(
        "bnb folder + --quantize",
        eval_loss("qlora_model", &data, &["--quantize", "nf4"]),
        bnb[0],
        1e-5,
    );
    let ours = eval_loss("llama_gqa", &data, &["--quantize", "nf4"]);
    close("llama_gqa --quantize nf4", ours, bnb[0], 1e-5);
    assert!(
        (ours - f32_loss[0]).abs() > 1e-3,
        "quantization changes the loss"
    );
    let adapter = golden("lora").join("adapter");
    let adapter = adapter.to_str().expect("utf-8 path");
    close(
        "bnb folder + lora adapter",
        eval_loss(
            "qlora_model",
            &data,
            &["--adapter", adapter, "--quantize", "nf4"],
        ),
        bnb_lora[0],
        1e-5,
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_bellows"))
        .args(["eval", "--model"])
        .arg(golden("llama_gqa"))
        .arg("--data")
        .arg(&data)
        .args(["--quantize", "int3"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nf4"));
}

#[test]
fn generate_quantize_nf4_runs_on_the_4bit_model() {
    let run = |model: &str, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bellows"))
            .args(["generate", "--model"])
            .arg(golden(model))
            .args(["--prompt-ids", "5,17,33,9", "--max-new-tokens", "6"])
            .args(extra)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let saved = run("qlora_model", &[]);
    assert_eq!(saved.split(',').count(), 6, "{saved}");
    assert_eq!(run("qlora_model", &["--quantize", "nf4"]), saved);
    let ours = run("llama_gqa", &["--quantize", "nf4"]);
    assert_eq!(ours.split(',').count(), 6, "{ours}");
}
