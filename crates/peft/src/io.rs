//! PEFT's `adapter_config.json`: bellows' `[peft]` names mapped to PEFT's keys
//! (`r` → `r`, `alpha` → `lora_alpha`, `dropout` → `lora_dropout`, `init` → `init_lora_weights`).

use serde_json::{json, Value};

use crate::config::{LoraInit, PeftConfig, TargetModules};

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
        "library_name": "bellows",
    })
}
