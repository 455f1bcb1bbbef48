//! Target `manifest`: a checkpoint's `manifest.json` through [`verify_checkpoint`] (parse, format
//! and world-size checks, path checks, size and SHA-256 of every listed file, config hash).

use std::path::{Component, Path};

use bellows_trainer::checkpoint::{verify_checkpoint, Manifest};
use bellows_trainer::RunConfig;

/// Runs one input. Properties: errors name a file or folder; an accepted manifest lists only
/// relative paths that stay inside the checkpoint folder.
pub fn run(data: &[u8], scratch: &Path) {
    let dir = scratch.join("checkpoint-1");
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let _ = std::fs::write(dir.join("config.toml"), "[run]\nseed = 1\n");
    let _ = std::fs::write(dir.join("loader-rank-0.json"), "{}");
    if std::fs::write(dir.join("manifest.json"), data).is_err() {
        return;
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(m) = Manifest::parse(&dir.join("manifest.json"), text) {
            let names = m.files.keys().chain(&m.loader_files).chain(m.dtypes.keys());
            for name in names {
                assert!(
                    !name.is_empty()
                        && Path::new(name)
                            .components()
                            .all(|c| matches!(c, Component::Normal(_))),
                    "accepted a path outside the checkpoint: {name:?}"
                );
            }
        }
    }
    let cfg = RunConfig::default();
    if let Err(e) = verify_checkpoint(&dir, &cfg, 1) {
        assert!(e.to_string().contains("checkpoint-1"), "{e}");
    }
}
