//! Reading and writing Hugging Face `config.json` (transformers 4.x and 5.x styles).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::config::{Family, ModelArch, RopeScaling, SlidingWindow};
use crate::{Error, Result};

fn cfg_err(path: &Path, key: &str, message: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        key: key.into(),
        message: message.into(),
    }
}

struct Reader<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| cfg_err(self.path, key, "missing")),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                cfg_err(
                    self.path,
                    key,
                    format!("expected a non-negative integer, got {v}"),
                )
            }),
        }
    }

    fn f64_or(&self, obj: &Map<String, Value>, key: &str, default: Option<f64>) -> Result<f64> {
        match obj.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| cfg_err(self.path, key, "missing")),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| cfg_err(self.path, key, format!("expected a number, got {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| cfg_err(self.path, key, format!("expected true or false, got {v}"))),
        }
    }

    fn token(&self, key: &str) -> Option<u32> {
        match self.obj.get(key)? {
            Value::Number(n) => n.as_u64().map(|n| n as u32),
            Value::Array(a) => a.first()?.as_u64().map(|n| n as u32),
            _ => None,
        }
    }
}

/// Parses a `config.json` into a [`ModelArch`]. Accepts transformers 4.x keys (`rope_theta`,
/// `rope_scaling`, `torch_dtype`) and 5.x keys (`rope_parameters`, `dtype`); `head_dim` may be absent.
///
/// # Errors
/// Malformed JSON, an unsupported `model_type` or activation, or a bad value, naming the key.
pub fn parse_config(path: &Path, text: &str) -> Result<ModelArch> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| cfg_err(path, "<json>", e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| cfg_err(path, "<json>", "expected a JSON object"))?;
    let r = Reader { path, obj };
    let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or("");
    let family = match model_type {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" => Family::Qwen2,
        other => {
            return Err(cfg_err(
                path,
                "model_type",
                format!(
                    "unsupported {other:?}; bellows supports \"llama\", \"mistral\" and \"qwen2\""
                ),
            ))
        }
    };
    if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(cfg_err(
                path,
                "hidden_act",
                format!("unsupported {act:?}; expected \"silu\""),
            ));
        }
    }
    let hidden = r.usize_or("hidden_size", None)?;
    let heads = r.usize_or("num_attention_heads", None)?;
    if heads == 0 {
        return Err(cfg_err(path, "num_attention_heads", "must be >= 1"));
    }
    let empty = Map::new();
    let rope_params = obj.get("rope_parameters").and_then(Value::as_object);
    let legacy_scaling = obj.get("rope_scaling").and_then(Value::as_object);
    let rope_theta = match rope_params {
        Some(p) if p.contains_key("rope_theta") => r.f64_or(p, "rope_theta", None)?,
        _ => r.f64_or(obj, "rope_theta", Some(10000.0))?,
    };
    let scaling_obj = legacy_scaling.or(rope_params).unwrap_or(&empty);
    let rope_type = scaling_obj
        .get("rope_type")
        .or_else(|| scaling_obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let max_pos = r.usize_or("max_position_embeddings", Some(2048))?;
    let rope_scaling = match rope_type {
        "default" => None,
        "llama3" => Some(RopeScaling::Llama3 {
            factor: r.f64_or(scaling_obj, "factor", None)?,
            low_freq_factor: r.f64_or(scaling_obj, "low_freq_factor", None)?,
            high_freq_factor: r.f64_or(scaling_obj, "high_freq_factor", None)?,
            original_max_position_embeddings: scaling_obj
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    cfg_err(
                        path,
                        "rope_scaling.original_max_position_embeddings",
                        "missing",
                    )
                })? as usize,
        }),
        "linear" => Some(RopeScaling::Linear {
            factor: r.f64_or(scaling_obj, "factor", None)?,
        }),
        other => {
            return Err(cfg_err(
                path,
                "rope_scaling.rope_type",
                format!(
                "unsupported {other:?}; bellows supports \"default\", \"linear\" and \"llama3\""
            ),
            ))
        }
    };
    let head_dim = match obj.get("head_dim") {
        None | Some(Value::Null) => hidden / heads,
        Some(_) => r.usize_or("head_dim", None)?,
    };
    let arch = ModelArch {
        family,
        vocab_size: r.usize_or("vocab_size", None)?,
        hidden_size: hidden,
        intermediate_size: r.usize_or("intermediate_size", None)?,
        num_hidden_layers: r.usize_or("num_hidden_layers", None)?,
        num_attention_heads: heads,
        num_key_value_heads: r.usize_or("num_key_value_heads", Some(heads))?,
        head_dim,
        rms_norm_eps: r.f64_or(obj, "rms_norm_eps", Some(1e-6))?,
        rope_theta,
        rope_scaling,
        max_position_embeddings: max_pos,
        tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
        attention_bias: family == Family::Qwen2 || r.bool_or("attention_bias", false)?,
        initializer_range: r.f64_or(obj, "initializer_range", Some(0.02))?,
        bos_token_id: r.token("bos_token_id"),
        eos_token_id: r.token("eos_token_id"),
        sliding_window: None,
    };
    let arch = ModelArch {
        sliding_window: sliding_window(&r, family, arch.num_hidden_layers)?,
        ..arch
    };
    let mut issues = Vec::new();
    arch.validate("", &mut issues);
    if let Some((k, m)) = issues.into_iter().next() {
        return Err(cfg_err(path, k.trim_start_matches('.'), m));
    }
    Ok(arch)
}

/// The sliding window as transformers 5.x decides it: Mistral windows every layer with
/// `sliding_window` (absent means transformers' default 4096, `null` means none); Qwen2 only with
/// `use_sliding_window: true`, in the layers `layer_types` marks `"sliding_attention"`, or else in
/// layers `i >= max_window_layers` (default 28); Llama never.
fn sliding_window(r: &Reader<'_>, family: Family, layers: usize) -> Result<Option<SlidingWindow>> {
    let size = |default| match r.obj.get("sliding_window") {
        Some(Value::Null) => Ok(None),
        _ => r.usize_or("sliding_window", Some(default)).map(Some),
    };
    let windowed = match family {
        Family::Llama => return Ok(None),
        Family::Mistral => vec![true; layers],
        Family::Qwen2 if !r.bool_or("use_sliding_window", false)? => return Ok(None),
        Family::Qwen2 => match r.obj.get("layer_types") {
            Some(Value::Array(types)) => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(cfg_err(
                        r.path,
                        "layer_types",
                        format!("expected \"full_attention\" or \"sliding_attention\", got {t}"),
                    )),
                })
                .collect::<Result<_>>()?,
            _ => {
                let first = r.usize_or("max_window_layers", Some(28))?;
                (0..layers).map(|i| i >= first).collect()
            }
        },
    };
    Ok(size(4096)?.map(|size| SlidingWindow {
        size,
        layers: windowed,
    }))
}

/// A transformers-compatible `config.json` for `arch` (4.x key style, which 5.x also reads).
pub fn to_config_json(arch: &ModelArch, dtype: &str) -> Value {
    let mut v = json!({
        "architectures": [arch.family.architecture()],
        "model_type": arch.family.model_type(),
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "initializer_range": arch.initializer_range,
        "torch_dtype": dtype,
        "use_cache": true,
    });
    let m = v.as_object_mut().expect("json! object literal");
    if arch.family != Family::Qwen2 {
        m.insert("attention_bias".into(), json!(arch.attention_bias));
    }
    if let Some(b) = arch.bos_token_id {
        m.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = arch.eos_token_id {
        m.insert("eos_token_id".into(), json!(e));
    }
    let scaling = match arch.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings
        }),
    };
    m.insert("rope_scaling".into(), scaling);
    let window = arch.sliding_window.as_ref();
    match arch.family {
        Family::Llama => {}
        Family::Mistral => {
            m.insert("sliding_window".into(), json!(window.map(|w| w.size)));
        }
        Family::Qwen2 => {
            let n = arch.num_hidden_layers;
            let windowed = |i: usize| arch.window_of(i).is_some();
            let types: Vec<&str> = (0..n)
                .map(|i| {
                    if windowed(i) {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            m.insert("use_sliding_window".into(), json!(window.is_some()));
            m.insert("sliding_window".into(), json!(window.map(|w| w.size)));
            let first = (0..n).find(|&i| windowed(i)).unwrap_or(n);
            m.insert("max_window_layers".into(), json!(first));
            m.insert("layer_types".into(), json!(types));
        }
    }
    v
}
