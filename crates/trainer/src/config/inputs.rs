//! Checks of the files a [`RunConfig`] names (run by [`RunConfig::load`] once the config itself is
//! valid): data files exist and are in a readable format, the model folder's `config.json` parses
//! and describes a valid architecture, a resume folder holds a checkpoint, the output folder is
//! not a file. Cheap: a few bytes per data file, no tensors.

use super::{Resume, RunConfig};

/// Pushes `(dotted key, message)` for every named input that is missing or unusable.
pub(crate) fn check(cfg: &RunConfig, out: &mut Vec<(String, String)>) {
    cfg.data.check_inputs("data", out);
    if let Some(dir) = &cfg.model.path {
        // A missing config.json is reported by validation; here it is parsed and checked
        // (`parse_config` validates the architecture), naming the file and its key.
        if dir.join("config.json").is_file() {
            if let Err(e) = bellows_models::hf::read_arch(dir) {
                out.push(("model.path".into(), e.to_string()));
            }
        }
    }
    if let Resume::Path(p) = &cfg.checkpoint.resume {
        if !p.join(crate::checkpoint::MANIFEST).is_file() {
            out.push((
                "checkpoint.resume".into(),
                format!(
                    "{} has no manifest.json (not a complete checkpoint folder)",
                    p.display()
                ),
            ));
        }
    }
    let o = &cfg.run.output_dir;
    if o.exists() && !o.is_dir() {
        out.push((
            "run.output_dir".into(),
            format!("{} exists and is not a folder", o.display()),
        ));
    }
}
