//! `manifest.json`: what a checkpoint holds, readable by people and checked on resume.
//!
//! The manifest is written last, after every other file is complete and fsynced; its `files` table
//! gives the size and SHA-256 of each, so a flipped byte or a truncated file is found before
//! anything is loaded.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::{Table, Value};

use crate::config::RunConfig;
use crate::{Error, Result};

/// Version of the on-disk layout; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// Config keys (or whole sections) left out of the config hash because changing them on resume
/// does not change what the remaining steps compute, or is a deliberate choice of the user:
///
/// - `run.output_dir`: a run folder may be moved or copied;
/// - `run.max_steps`: a run may be extended (the LR schedule is a function of `(step, max_steps)`,
///   so a changed `max_steps` changes the remaining learning rates; the result then differs from
///   an uninterrupted run of the old length, as intended);
/// - `run.log_every`, `run.eval_every`, `run.eval_max_batches`: what is logged and evaluated;
/// - `checkpoint.*`: how often to save and where to resume from;
/// - `logging.*`: outputs only;
/// - `dist.*`: transport and timeouts (the world size is checked on its own).
pub const HASH_EXCLUDED: [&str; 8] = [
    "run.output_dir",
    "run.max_steps",
    "run.log_every",
    "run.eval_every",
    "run.eval_max_batches",
    "checkpoint",
    "logging",
    "dist",
];

/// Size and content hash of one checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Length in bytes.
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the contents.
    pub sha256: String,
}

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The bellows version that wrote it.
    pub bellows_version: String,
    /// SHA-256 (16 hex digits) of the resolved config without the keys in [`HASH_EXCLUDED`].
    pub config_hash: String,
    /// The keys left out of `config_hash`.
    pub config_hash_excludes: Vec<String>,
    /// Number of ranks that wrote it.
    pub world_size: usize,
    /// Optimizer steps completed.
    pub step: u64,
    /// Loss-counted training tokens seen (all ranks).
    pub tokens: u64,
    /// The loss of every step `1..=step`, in order (`null` for a non-finite one).
    #[serde(with = "losses_json")]
    pub losses: Vec<f64>,
    /// fp16's loss scaler state (absent for other precisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::precision::LossScaler>,
    /// Steps whose update was skipped (non-finite gradients or fp16 overflow).
    #[serde(default)]
    pub skipped_steps: u64,
    /// `"trainable"` (adapters and `modules_to_save` only) or `"full"` (every parameter).
    pub weights: String,
    /// Dtypes in each tensor file (`"model.safetensors": ["f32"]`).
    pub dtypes: BTreeMap<String, Vec<String>>,
    /// Per rank, the file with the data loader state after the last consumed batch.
    pub loader_files: Vec<String>,
    /// Sharded checkpoints (FSDP): how the per-rank tensor files split the tensors; absent for
    /// consolidated ones (`model.safetensors`, `optimizer.safetensors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<super::sharded::ShardLayout>,
    /// Every other file of the checkpoint (relative path → size and hash).
    pub files: BTreeMap<String, FileEntry>,
}

/// JSON has no NaN/Inf: a non-finite loss (a skipped step) is written as `null` and read back as NaN.
mod losses_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<Option<f64>> = v.iter().map(|x| x.is_finite().then_some(*x)).collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let v = Vec::<Option<f64>>::deserialize(d)?;
        Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
    }
}

impl Manifest {
    /// Reads and parses `<dir>/manifest.json`.
    ///
    /// # Errors
    /// The file is missing, unreadable or not a manifest.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&path, &text)
    }

    /// Parses manifest text; `file` only names the source in errors.
    ///
    /// Every file name it lists (`files`, `loader_files`, `dtypes`) must be a relative path that
    /// stays inside the checkpoint folder: no `..`, no absolute path, no empty name. A manifest
    /// is read from disk and may come from anywhere, so it must not steer reads (or, through a
    /// later copy or cleanup, writes) outside its folder.
    ///
    /// # Errors
    /// Malformed JSON, a missing field, or an unsafe file name, as [`Error::CheckpointCorrupt`].
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let corrupt = |message: String| Error::CheckpointCorrupt {
            file: file.to_path_buf(),
            message,
        };
        let m: Manifest = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        let names = m
            .files
            .keys()
            .map(|k| ("files", k))
            .chain(m.loader_files.iter().map(|k| ("loader_files", k)))
            .chain(m.dtypes.keys().map(|k| ("dtypes", k)))
            .chain(
                m.shards
                    .iter()
                    .flat_map(|s| s.files().map(|k| ("shards", k))),
            );
        for (field, name) in names {
            if !is_inside(name) {
                return Err(corrupt(format!(
                    "{field}: {name:?} is not a relative path inside the checkpoint folder"
                )));
            }
        }
        Ok(m)
    }
}

/// Whether `name` is a non-empty relative path made only of plain components (no `..`, `.`,
/// root or drive prefix), so joining it to a folder stays inside that folder.
pub(crate) fn is_inside(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Lowercase hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The resolved config as a TOML table without the keys in [`HASH_EXCLUDED`].
pub(crate) fn hashed_config(toml_text: &str) -> Table {
    let mut table: Table = toml_text.parse().unwrap_or_default();
    for key in HASH_EXCLUDED {
        match key.split_once('.') {
            Some((section, leaf)) => {
                if let Some(Value::Table(t)) = table.get_mut(section) {
                    t.remove(leaf);
                }
            }
            None => {
                table.remove(key);
            }
        }
    }
    table
}

/// The config hash recorded in manifests (see [`Manifest::config_hash`]).
pub fn checkpoint_config_hash(cfg: &RunConfig) -> String {
    let table = hashed_config(&cfg.to_toml());
    let text = toml::to_string(&table).unwrap_or_default();
    sha256_hex(text.as_bytes())[..16].to_string()
}

/// The dotted keys whose values differ between two hashed configs, as `key: old -> new`.
pub(crate) fn config_diff(old: &Table, new: &Table) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

fn flatten(prefix: &str, t: &Table, out: &mut BTreeMap<String, String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Table(inner) => flatten(&key, inner, out),
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_names_are_inside() {
        for ok in ["model.safetensors", "adapter/adapter_config.json"] {
            assert!(is_inside(ok), "{ok}");
        }
        for bad in ["", "../x", "../../x", "/etc/passwd", "a/../../x", "./a"] {
            assert!(!is_inside(bad), "{bad}");
        }
    }

    #[test]
    fn excluded_keys_do_not_change_the_hash_and_others_are_named() {
        let a = "[run]\nmax_steps = 10\nseed = 1\n[logging]\nprogress = \"quiet\"\n";
        let b = "[run]\nmax_steps = 20\nseed = 2\n[logging]\nprogress = \"bar\"\n";
        let diff = config_diff(&hashed_config(a), &hashed_config(b));
        assert_eq!(diff, ["run.seed: 1 -> 2"]);
    }
}
