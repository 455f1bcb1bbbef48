//! `metrics.jsonl` on resume: the log is cut back to the checkpoint's step, so the resumed run
//! continues it without duplicate steps.
//!
//! The killed run may have logged steps after its last checkpoint (they are recomputed, with the
//! same values, by the resumed run) and may have left a half-written last line; both are dropped.
//! Rewritten atomically (temporary file, fsync, rename).

use std::path::Path;

use crate::{Error, Result};

/// Keeps only the lines of `<dir>/metrics.jsonl` whose `step` is at most `step`.
///
/// # Errors
/// The file exists but cannot be read or rewritten.
pub fn truncate_metrics(dir: &Path, step: u64) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut kept = String::new();
    for line in text.lines() {
        let s = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
        if s.is_some_and(|s| s <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    super::save::write_synced(&tmp, kept.as_bytes())?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}
