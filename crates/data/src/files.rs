//! Turning configured patterns into a list of concrete files with their formats.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{DataConfig, Error, Files, Result};

impl DataConfig {
    /// Checks that the inputs the config names exist: every `train`/`eval` pattern matches a
    /// readable file in a format bellows reads, and `tokenizer` is a file. Pushes `(dotted key,
    /// message)`; `at` is the section prefix (`"data"`). Run once [`DataConfig::validate`] passed;
    /// cheap (reads a few bytes per file, not the data).
    pub fn check_inputs(&self, at: &str, out: &mut Vec<(String, String)>) {
        let mut check = |key: &str, files: &Files| {
            let first_problem = resolve(files).and_then(|found| {
                found
                    .iter()
                    .filter(|f| f.format == Format::Jsonl)
                    .try_for_each(|f| check_first_line(&f.path))
            });
            if let Err(e) = first_problem {
                out.push((format!("{at}.{key}"), e.to_string()));
            }
        };
        check("train", &self.train);
        if let Some(eval) = &self.eval {
            check("eval", eval);
        }
        if let Some(t) = &self.tokenizer {
            if !t.is_file() {
                out.push((
                    format!("{at}.tokenizer"),
                    format!("{} is not a file", t.display()),
                ));
            }
        }
    }
}

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

/// A file without Parquet/Arrow magic is read as JSONL: its first non-blank line (within the
/// first 64 KiB) must be a JSON object, so a wrong file is reported before training starts.
fn check_first_line(path: &Path) -> Result<()> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
        .map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8_lossy(&head);
    let Some(line) = text.lines().find(|l| !l.trim().is_empty()) else {
        return Ok(());
    };
    if head.len() == 64 << 10 && !text.contains('\n') {
        return Ok(()); // One very long first line: leave it to the reader.
    }
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        _ => Err(Error::corrupt(
            path,
            "not Parquet or Arrow IPC, and its first line is not a JSON object (JSONL)",
        )),
    }
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
        let plain = Path::new(name).components().count() == 1
            && matches!(
                Path::new(name).components().next(),
                Some(std::path::Component::Normal(_))
            );
        if !plain {
            return Err(Error::corrupt(
                &state,
                format!("\"_data_files\" entry {name:?} is not a plain file name in this folder"),
            ));
        }
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
