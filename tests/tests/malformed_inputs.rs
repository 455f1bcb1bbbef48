//! Damaged model and adapter files give an error naming the file and the tensor or key, never a
//! panic: safetensors (truncated, huge or garbage header, offsets past the end, wrong dtype or
//! shape, hostile shard index), `config.json` and `adapter_config.json`. Data files (Parquet,
//! Arrow, JSONL, tokenizer.json) are covered in `crates/data/tests/`.

use std::path::Path;

use bellows_models::hf::{parse_config, read_arch, WeightFiles};
use bellows_peft::{parse_adapter_config, read_adapter_config};

/// A safetensors file: 8-byte little-endian header length, JSON header, data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

const GOOD_HEADER: &str = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"i":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}}"#;

fn good() -> Vec<u8> {
    safetensors(GOOD_HEADER, &[0u8; 24])
}

fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    let err = WeightFiles::open_file(&path).expect_err(name).to_string();
    assert!(err.contains(name), "does not name the file: {err}");
    err
}

#[test]
fn damaged_safetensors_headers_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let full = good();
    // Cut inside the data, inside the header, inside the length prefix, and empty.
    for (i, cut) in [full.len() - 3, 20, 5, 0].into_iter().enumerate() {
        let err = open_err(d, &format!("cut{i}.safetensors"), &full[..cut]);
        assert!(err.contains("<header>"), "{err}");
    }
    // A header length of 1 TiB (would be a huge allocation if trusted) and one just past the file.
    let mut huge = good();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = open_err(d, "huge.safetensors", &huge);
    assert!(err.contains("<header>"), "{err}");
    let mut past = good();
    past[..8].copy_from_slice(&(full.len() as u64).to_le_bytes());
    open_err(d, "past.safetensors", &past);
    // A header that is not JSON, not an object, or has offsets past the data.
    open_err(
        d,
        "garbage.safetensors",
        &safetensors("not json at all!", &[]),
    );
    open_err(d, "array.safetensors", &safetensors("[1, 2, 3]", &[]));
    let beyond = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,1600]}}"#;
    open_err(d, "beyond.safetensors", &safetensors(beyond, &[0u8; 16]));
    let mismatch = r#"{"w":{"dtype":"F32","shape":[3,3],"data_offsets":[0,16]}}"#;
    open_err(
        d,
        "mismatch.safetensors",
        &safetensors(mismatch, &[0u8; 16]),
    );
}

#[test]
fn unusable_tensors_are_errors_naming_file_and_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, good()).expect("write");
    let w = WeightFiles::open_file(&path).expect("a valid file opens");
    let err = w.read_f32("w", &[4, 1]).expect_err("shape").to_string();
    assert!(
        err.contains("model.safetensors: w: shape [2, 2], expected [4, 1]"),
        "{err}"
    );
    let err = w.read_f32("i", &[1]).expect_err("dtype").to_string();
    assert!(
        err.contains("model.safetensors: i: unsupported dtype I64"),
        "{err}"
    );
    let err = w.read_f32("nope", &[1]).expect_err("missing").to_string();
    assert!(err.contains("nope: missing tensor"), "{err}");
}

#[test]
fn a_shard_index_naming_files_outside_its_folder_or_malformed_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let index = d.join("model.safetensors.index.json");
    for (text, want) in [
        (
            r#"{"weight_map": {"w": "../outside.safetensors"}}"#,
            "shard names must be plain file names",
        ),
        (
            r#"{"weight_map": {"w": "/etc/outside.safetensors"}}"#,
            "shard names must be plain file names",
        ),
        (
            r#"{"weight_map": [1]}"#,
            "weight_map: missing or not an object",
        ),
        (
            r#"{"weight_map": {"#,
            "model.safetensors.index.json: <index>",
        ),
        (
            r#"{"weight_map": {"w": "model-00001.safetensors"}}"#,
            "model-00001.safetensors",
        ),
    ] {
        std::fs::write(&index, text).expect("write");
        let err = WeightFiles::open(d).expect_err(text).to_string();
        assert!(err.contains(want), "{text}: {err}");
    }
}

#[test]
fn malformed_config_json_names_the_file_and_key() {
    let path = Path::new("m/config.json");
    let base = r#""model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4"#;
    for (text, want) in [
        (
            "{\"model_type\": \"llama\",".to_string(),
            "m/config.json: <json>: EOF while parsing",
        ),
        (
            "[1, 2]".to_string(),
            "m/config.json: <json>: expected a JSON object",
        ),
        (
            "{\"model_type\": \"gpt2\"}".to_string(),
            "m/config.json: model_type: unsupported \"gpt2\"",
        ),
        (
            format!("{{{base}, \"hidden_act\": \"gelu\"}}"),
            "m/config.json: hidden_act: unsupported \"gelu\"",
        ),
        (
            base.replace("\"vocab_size\": 64", "\"vocab_size\": \"big\"")
                .pipe_braces(),
            "m/config.json: vocab_size: expected a non-negative integer, got \"big\"",
        ),
        (
            base.replace("\"vocab_size\": 64, ", "").pipe_braces(),
            "m/config.json: vocab_size: missing",
        ),
        (
            format!("{{{base}, \"rms_norm_eps\": \"tiny\"}}"),
            "m/config.json: rms_norm_eps: expected a number",
        ),
        (
            format!("{{{base}, \"num_key_value_heads\": 3}}"),
            "m/config.json: num_key_value_heads: must divide num_attention_heads",
        ),
        (
            format!("{{{base}, \"rope_scaling\": {{\"rope_type\": \"yarn\", \"factor\": 2}}}}"),
            "m/config.json: rope_scaling.rope_type: unsupported \"yarn\"",
        ),
        (
            format!("{{{base}, \"tie_word_embeddings\": \"yes\"}}"),
            "m/config.json: tie_word_embeddings: expected true or false",
        ),
    ] {
        let err = parse_config(path, &text).expect_err(&text).to_string();
        assert!(err.contains(want), "{text}\n{err}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let err = read_arch(dir.path()).expect_err("no file").to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn malformed_adapter_config_json_names_the_file_and_key() {
    let path = Path::new("a/adapter_config.json");
    for (text, want) in [
        ("{\"peft_type\": \"LORA\"", "EOF while parsing"),
        ("\"LORA\"", "expected a JSON object"),
        ("{\"r\": 8}", "peft_type: missing"),
        ("{\"peft_type\": 3}", "peft_type: expected a string"),
        (
            r#"{"peft_type": "LORA", "r": "eight", "lora_alpha": 16, "target_modules": ["q_proj"]}"#,
            "r: expected an integer",
        ),
        (
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": 7}"#,
            "target_modules: expected a string or a list of strings",
        ),
        (
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", 3]}"#,
            "target_modules",
        ),
        (
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": "yes"}"#,
            "use_dora: expected true or false",
        ),
    ] {
        let err = parse_adapter_config(path, text)
            .expect_err(text)
            .to_string();
        assert!(
            err.contains("a/adapter_config.json") && err.contains(want),
            "{text}\n{err}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let err = read_adapter_config(dir.path())
        .expect_err("no file")
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
}

/// Wraps a key list in braces (keeps the table above readable).
trait PipeBraces {
    fn pipe_braces(self) -> String;
}

impl PipeBraces for String {
    fn pipe_braces(self) -> String {
        format!("{{{self}}}")
    }
}
