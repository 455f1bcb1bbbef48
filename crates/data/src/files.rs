//! Turning configured patterns into a list of concrete files with their formats.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Error, Files, Result};

/// How a file is laid out on disk, decided from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// Apache Parquet (`PAR1` magic).
    Parquet,
    /// Arrow IPC file format (`ARROW1` magic); its messages start at byte 8.
    IpcFile,
    /// Arrow IPC stream format (what `datasets.save_to_disk` writes).
    IpcStream,
    /// One JSON object per line.
    Jsonl,
}

/// A file to read and its format.
#[derive(Clone, Debug)]
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub format: Format,
}

/// Expands paths, globs and `save_to_disk` folders in order. Glob results are sorted.
///
/// # Errors
/// A pattern that matches nothing, an unreadable or empty file, a folder that is not a dataset.
pub(crate) fn resolve(files: &Files) -> Result<Vec<SourceFile>> {
    let mut out = Vec::new();
    for pattern in files.patterns() {
        let mut matched = expand(pattern)?;
        if matched.is_empty() {
            return Err(Error::NoMatch {
                pattern: pattern.clone(),
            });
        }
        matched.sort();
        for path in matched {
            if path.is_dir() {
                for p in hf_folder_files(&path)? {
                    out.push(SourceFile {
                        format: sniff(&p)?,
                        path: p,
                    });
                }
            } else {
                out.push(SourceFile {
                    format: sniff(&path)?,
                    path,
                });
            }
        }
    }
    Ok(out)
}

fn expand(pattern: &str) -> Result<Vec<PathBuf>> {
    let is_glob = pattern.contains(['*', '?', '[']);
    if !is_glob {
        let p = PathBuf::from(pattern);
        return Ok(if p.exists() { vec![p] } else { vec![] });
    }
    let paths = glob::glob(pattern).map_err(|e| Error::BadPattern {
        pattern: pattern.to_string(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for entry in paths {
        match entry {
            Ok(p) => out.push(p),
            Err(e) => {
                let path = e.path().to_path_buf();
                return Err(Error::io(&path, e.into()));
            }
        }
    }
    Ok(out)
}

/// The `.arrow` files of a Hugging Face `datasets` `save_to_disk` folder, in `state.json` order.
fn hf_folder_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let state = dir.join("state.json");
    if !state.exists() {
        let hint = if dir.join("dataset_dict.json").exists() {
            " (a DatasetDict: point at one split's folder, e.g. train/)"
        } else {
            ""
        };
        return Err(Error::corrupt(
            dir,
            format!("folder has no state.json, so it is not a save_to_disk dataset{hint}"),
        ));
    }
    let text = std::fs::read_to_string(&state).map_err(|e| Error::io(&state, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::corrupt(&state, e))?;
    let list = json
        .get("_data_files")
        .and_then(|v| v.as_array())
        .ok_or_else(|| Error::corrupt(&state, "no \"_data_files\" list"))?;
    let mut out = Vec::new();
    for entry in list {
        let name = entry
            .get("filename")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::corrupt(&state, "a \"_data_files\" entry has no \"filename\""))?;
        out.push(dir.join(name));
    }
    if out.is_empty() {
        return Err(Error::EmptyFile { path: state });
    }
    Ok(out)
}

/// Decides the format from the first 8 bytes.
pub(crate) fn sniff(path: &Path) -> Result<Format> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 8];
    let mut n = 0;
    while n < head.len() {
        let k = f.read(&mut head[n..]).map_err(|e| Error::io(path, e))?;
        if k == 0 {
            break;
        }
        n += k;
    }
    let head = &head[..n];
    Ok(if n == 0 {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    } else if head.starts_with(b"PAR1") {
        Format::Parquet
    } else if head.starts_with(b"ARROW1") {
        Format::IpcFile
    } else if head.starts_with(&[0xff, 0xff, 0xff, 0xff]) {
        Format::IpcStream
    } else {
        Format::Jsonl
    })
}
