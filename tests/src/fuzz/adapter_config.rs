//! Target `adapter_config`: PEFT's `adapter_config.json` through [`parse_adapter_config`], then
//! validation and plan building as `bellows eval --adapter` and `load_adapter` do.

use std::path::Path;

use bellows_peft::parse_adapter_config;

/// Runs one input. Properties: errors name the file; an accepted config that validates also
/// builds a plan.
pub fn run(data: &[u8], _scratch: &Path) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz/adapter_config.json");
    match parse_adapter_config(path, text) {
        Err(e) => assert!(e.to_string().contains("fuzz/adapter_config.json"), "{e}"),
        Ok(cfg) => {
            let mut issues = Vec::new();
            cfg.validate("peft", &mut issues);
            if issues.is_empty() {
                if let Ok(plan) = cfg.plan() {
                    let _ = plan.spec_for("model.layers.0.self_attn.q_proj", false);
                    let _ = plan.spec_for("lm_head", true);
                }
            }
        }
    }
}
