//! PEFT's `adapter_config.json`, written and read: bellows' `[peft]` names mapped to PEFT's keys
//! (`r` → `r`, `alpha` → `lora_alpha`, `dropout` → `lora_dropout`, `init` → `init_lora_weights`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::config::{LoraInit, Method, PeftConfig, TargetModules};
use crate::{Error, Result};

/// The `adapter_config.json` PEFT writes for an equivalent `LoraConfig` (task `CAUSAL_LM`).
pub fn adapter_config_json(cfg: &PeftConfig, base_model: &str) -> Value {
    let targets = match &cfg.target_modules {
        TargetModules::Names(v) => json!(v),
        TargetModules::Pattern(p) => json!(p),
    };
    let none_if_empty = |v: &Vec<String>| if v.is_empty() { Value::Null } else { json!(v) };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": if base_model.is_empty() { Value::Null } else { json!(base_model) },
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "exclude_modules": none_if_empty(&cfg.exclude_modules),
        "layers_to_transform": if cfg.layers_to_transform.is_empty() { Value::Null } else { json!(cfg.layers_to_transform) },
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "modules_to_save": none_if_empty(&cfg.modules_to_save),
        "init_lora_weights": match cfg.init { LoraInit::Default => json!(true), LoraInit::Gaussian => json!("gaussian") },
        "fan_in_fan_out": false,
        "bias": "none",
        "inference_mode": true,
        "revision": Value::Null,
    })
}

fn json_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Json {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads `<dir>/adapter_config.json` (see [`parse_adapter_config`]).
///
/// # Errors
/// The file is unreadable, or as [`parse_adapter_config`].
pub fn read_adapter_config(dir: &Path) -> Result<PeftConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })?;
    parse_adapter_config(&path, &text)
}

/// Parses PEFT's `adapter_config.json` into a `[peft]` config with `method = "lora"`.
///
/// Lenient like PEFT itself: unknown keys (PEFT adds some every release) are ignored, and optional
/// keys may be missing or `null`. `peft_type` must be `"LORA"`; `r`, `lora_alpha` and
/// `target_modules` are required.
///
/// # Errors
/// Malformed JSON, another `peft_type` ([`Error::UnsupportedMethod`]), a missing required key, or a
/// key of the wrong type, naming the key.
pub fn parse_adapter_config(path: &Path, text: &str) -> Result<PeftConfig> {
    let v: Value = serde_json::from_str(text).map_err(|e| json_err(path, e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| json_err(path, "expected a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let required = |k: &str| get(k).ok_or_else(|| json_err(path, format!("{k}: missing")));
    let bad = |k: &str, want: &str| json_err(path, format!("{k}: expected {want}"));
    let peft_type = required("peft_type")?
        .as_str()
        .ok_or_else(|| bad("peft_type", "a string"))?;
    if peft_type != "LORA" {
        return Err(Error::UnsupportedMethod {
            path: path.to_path_buf(),
            peft_type: peft_type.into(),
        });
    }
    let r = required("r")?
        .as_u64()
        .ok_or_else(|| bad("r", "an integer"))? as usize;
    let alpha = required("lora_alpha")?
        .as_f64()
        .ok_or_else(|| bad("lora_alpha", "a number"))?;
    let target_modules = match required("target_modules")? {
        Value::String(s) => TargetModules::Pattern(s.clone()),
        Value::Array(a) => TargetModules::Names(strings(a, "target_modules", path)?),
        _ => return Err(bad("target_modules", "a string or a list of strings")),
    };
    let string_list = |k: &str| -> Result<Vec<String>> {
        match get(k) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => strings(a, k, path),
            Some(_) => Err(bad(k, "a string or a list of strings")),
        }
    };
    let flag = |k: &str| -> Result<bool> {
        get(k).map_or(Ok(false), |v| {
            v.as_bool().ok_or_else(|| bad(k, "true or false"))
        })
    };
    let layers_to_transform = match get("layers_to_transform") {
        None => Vec::new(),
        Some(Value::Number(n)) => vec![n
            .as_u64()
            .ok_or_else(|| bad("layers_to_transform", "a layer index"))?
            as usize],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|i| i as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("layers_to_transform", "a list of layer indices"))?,
        Some(_) => return Err(bad("layers_to_transform", "an index or a list of indices")),
    };
    let map = |k: &str| -> Result<BTreeMap<String, f64>> {
        match get(k) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(p, x)| {
                    Ok((
                        p.clone(),
                        x.as_f64()
                            .ok_or_else(|| bad(&format!("{k}.{p}"), "a number"))?,
                    ))
                })
                .collect(),
            Some(_) => Err(bad(k, "an object")),
        }
    };
    let rank_pattern = map("rank_pattern")?
        .into_iter()
        .map(|(p, r)| (p, r as usize))
        .collect();
    let dropout = match get("lora_dropout") {
        None => 0.0,
        Some(x) => x.as_f64().ok_or_else(|| bad("lora_dropout", "a number"))?,
    };
    let init = match get("init_lora_weights") {
        Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
        _ => LoraInit::Default,
    };
    if get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(json_err(
            path,
            "fan_in_fan_out: true (GPT-2 Conv1D layout) is not supported",
        ));
    }
    Ok(PeftConfig {
        method: Method::Lora,
        r,
        alpha,
        dropout,
        target_modules,
        exclude_modules: string_list("exclude_modules")?,
        layers_to_transform,
        rank_pattern,
        alpha_pattern: map("alpha_pattern")?,
        use_rslora: flag("use_rslora")?,
        use_dora: flag("use_dora")?,
        init,
        modules_to_save: string_list("modules_to_save")?,
        quantization: None,
    })
}

fn strings(a: &[Value], key: &str, path: &Path) -> Result<Vec<String>> {
    a.iter()
        .map(|x| x.as_str().map(String::from))
        .collect::<Option<_>>()
        .ok_or_else(|| json_err(path, format!("{key}: expected a list of strings")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "some_future_key": {"x": 1}, "layers_to_transform": null, "rank_pattern": {"v_proj": 2}}"#;

    #[test]
    fn reads_a_minimal_config_and_ignores_unknown_keys() {
        let c = parse_adapter_config(Path::new("a.json"), MINIMAL).expect("valid");
        assert_eq!((c.method, c.r, c.alpha), (Method::Lora, 4, 8.0));
        assert_eq!(
            c.target_modules,
            TargetModules::Names(vec!["q_proj".into()])
        );
        assert_eq!(c.rank_pattern.get("v_proj"), Some(&2));
    }

    #[test]
    fn round_trips_what_bellows_writes() {
        let mut cfg = PeftConfig {
            method: Method::Lora,
            r: 16,
            alpha: 32.0,
            use_dora: true,
            use_rslora: true,
            ..PeftConfig::default()
        };
        cfg.alpha_pattern.insert("o_proj".into(), 4.0);
        let text = adapter_config_json(&cfg, "base").to_string();
        assert_eq!(
            parse_adapter_config(Path::new("a.json"), &text).expect("valid"),
            cfg
        );
    }

    #[test]
    fn names_the_problem() {
        let e = parse_adapter_config(Path::new("a.json"), r#"{"peft_type": "IA3", "r": 1}"#)
            .expect_err("IA3");
        assert!(
            e.to_string().contains("unsupported peft_type \"IA3\""),
            "{e}"
        );
        let e = parse_adapter_config(
            Path::new("a.json"),
            r#"{"peft_type": "LORA", "r": 4, "target_modules": "q"}"#,
        )
        .expect_err("no alpha");
        assert!(e.to_string().contains("lora_alpha: missing"), "{e}");
    }
}
