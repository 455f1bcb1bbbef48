//! Target `hf_config`: a Hugging Face `config.json` through [`parse_config`].

use std::path::Path;

use bellows_models::hf::{parse_config, to_config_json};

/// Runs one input. Properties: errors name the file; an accepted config written back by
/// [`to_config_json`] parses again.
pub fn run(data: &[u8], _scratch: &Path) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz/config.json");
    match parse_config(path, text) {
        Err(e) => assert!(e.to_string().starts_with("fuzz/config.json: "), "{e}"),
        Ok(arch) => {
            let mut issues = Vec::new();
            arch.validate("model", &mut issues);
            let back = to_config_json(&arch, "float32").to_string();
            parse_config(path, &back)
                .unwrap_or_else(|e| panic!("written config.json does not parse again: {e}"));
        }
    }
}
