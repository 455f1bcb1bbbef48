//! Finding checkpoints in `<output_dir>/checkpoints` and keeping only the newest `keep_last`.
//!
//! Only folders named `checkpoint-<step>` that contain a `manifest.json` count: the manifest is
//! the last file written before the folder is renamed into place, so a temporary folder left by a
//! crash (`.tmp-checkpoint-<step>`) is never taken for a checkpoint.

use std::path::{Path, PathBuf};

use super::manifest::MANIFEST;
use crate::{Error, Result};

/// `<output_dir>/checkpoints`.
pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}

/// Every complete checkpoint under `root` as `(step, folder)`, oldest first.
///
/// # Errors
/// `root` exists but cannot be listed.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(root, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(MANIFEST).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `root`, if any.
///
/// # Errors
/// `root` exists but cannot be listed.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(root)?.pop().map(|(_, p)| p))
}

/// Deletes all but the newest `keep_last` checkpoints, and leftover temporary folders.
///
/// # Errors
/// A folder cannot be removed.
pub(crate) fn rotate(root: &Path, keep_last: usize) -> Result<()> {
    let all = list_checkpoints(root)?;
    let drop_n = all.len().saturating_sub(keep_last.max(1));
    for (step, dir) in &all[..drop_n] {
        // Renamed out of the way first, so a crash mid-delete never leaves a half-deleted
        // folder that still looks like a checkpoint.
        let doomed = root.join(format!(".tmp-rotated-checkpoint-{step}"));
        std::fs::rename(dir, &doomed).map_err(|e| Error::io(dir, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
    }
    Ok(())
}

/// Removes `.tmp-*` folders left by interrupted saves.
///
/// # Errors
/// A folder cannot be removed.
pub(crate) fn remove_stale_temps(root: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let p = entry.path();
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}
