//! Target `job_config`: a job TOML file through [`RunConfig::from_toml_str`] (parse, `--set`
//! overrides, per-section deserialisation, validation).
//!
//! Lines starting with `#set ` (TOML comments) are also applied as `--set` overrides, so the
//! override parser is fuzzed with the same input.

use std::path::Path;

use bellows_trainer::{config_hash, RunConfig};

/// The name the input is reported under.
pub const FILE: &str = "fuzz.toml";

/// Runs one input. Properties: every error names [`FILE`] and a non-empty key; an accepted
/// config renders as TOML that loads again to the same config.
pub fn run(data: &[u8], _scratch: &Path) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sets: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#set "))
        .map(String::from)
        .collect();
    match RunConfig::from_toml_str(text, Path::new(FILE), &sets) {
        Err(issues) => {
            assert!(!issues.issues.is_empty(), "an error without issues");
            for i in &issues.issues {
                assert!(!i.key.is_empty(), "an issue without a key: {i:?}");
            }
            let shown = issues.to_string();
            assert!(shown.starts_with(&format!("{FILE}: ")), "{shown}");
        }
        Ok(cfg) => {
            let again = RunConfig::from_toml_str(&cfg.to_toml(), Path::new(FILE), &[])
                .unwrap_or_else(|e| panic!("resolved config does not load again: {e}"));
            assert_eq!(
                config_hash(&again),
                config_hash(&cfg),
                "round trip changed the config"
            );
        }
    }
}
