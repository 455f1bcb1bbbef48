//! The job file: one struct per section, each owned by the crate that uses it, composed here.
//!
//! Loading is parse → apply `--set` overrides → deserialise section by section (collecting every
//! unknown key and type error with its dotted path) → validate ranges and combinations. Every
//! problem is reported as `<file>: <dotted.key>: <message>`.

mod conflicts;
mod inputs;
mod overrides;
mod sections;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

pub use overrides::{apply as apply_override, parse_value};
pub use sections::{
    CheckpointSection, InitSection, LoggingSection, LossScaleSection, ModelSection,
    NonFinitePolicy, OptimConfig, ParamDtype, Precision, ProgressStyle, Resume, RunSection,
    Scheduler, TrainSection,
};

/// A whole job file, resolved with defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `[run]`.
    pub run: RunSection,
    /// `[model]`.
    pub model: ModelSection,
    /// `[data]` (owned by `bellows-data`).
    pub data: bellows_data::DataConfig,
    /// `[optim]`.
    pub optim: OptimConfig,
    /// `[peft]` (owned by `bellows-peft`).
    pub peft: bellows_peft::PeftConfig,
    /// `[train]`.
    pub train: TrainSection,
    /// `[dist]` (owned by `bellows-dist`).
    pub dist: bellows_dist::DistConfig,
    /// `[checkpoint]`.
    pub checkpoint: CheckpointSection,
    /// `[logging]`.
    pub logging: LoggingSection,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            run: RunSection::default(),
            model: ModelSection::default(),
            data: bellows_data::DataConfig::new(bellows_data::Files::Many(Vec::new())),
            optim: OptimConfig::default(),
            peft: bellows_peft::PeftConfig::default(),
            train: TrainSection::default(),
            dist: bellows_dist::DistConfig::default(),
            checkpoint: CheckpointSection::default(),
            logging: LoggingSection::default(),
        }
    }
}

/// One problem in a job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key (`data.seq_len`), or `<syntax>` / `--set` for problems outside a key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssues {
    /// The file.
    pub file: PathBuf,
    /// The problems, in discovery order.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigIssues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                issue.key,
                issue.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigIssues {}

const SECTIONS: [&str; 9] = [
    "run",
    "model",
    "data",
    "optim",
    "peft",
    "train",
    "dist",
    "checkpoint",
    "logging",
];

impl RunConfig {
    /// Reads `path`, applies `overrides` (`dotted.key=value`), deserialises, validates, and checks
    /// the files it names ([`RunConfig::check_inputs`]).
    ///
    /// # Errors
    /// Every problem found, each with its dotted key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigIssues> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigIssues {
            file: path.to_path_buf(),
            issues: vec![ConfigIssue {
                key: "<file>".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let cfg = Self::from_toml_str(&text, path, overrides)?;
        cfg.check_inputs(path)?;
        Ok(cfg)
    }

    /// Checks the files this config names: data files exist and are Parquet/Arrow/JSONL, the
    /// tokenizer is a file, the model folder's `config.json` parses and is a valid architecture,
    /// a resume folder holds a checkpoint, and the output folder is not a file. [`RunConfig::load`]
    /// runs it; `file` names the job file in messages.
    ///
    /// # Errors
    /// Every missing or unusable input, each with its dotted key.
    pub fn check_inputs(&self, file: &Path) -> Result<(), ConfigIssues> {
        let mut found = Vec::new();
        inputs::check(self, &mut found);
        if found.is_empty() {
            Ok(())
        } else {
            Err(ConfigIssues {
                file: file.to_path_buf(),
                issues: found
                    .into_iter()
                    .map(|(key, message)| ConfigIssue { key, message })
                    .collect(),
            })
        }
    }

    /// Like [`RunConfig::load`] for TOML text; `file` only names the source in messages.
    ///
    /// # Errors
    /// Every problem found, each with its dotted key.
    pub fn from_toml_str(
        text: &str,
        file: &Path,
        overrides: &[String],
    ) -> Result<Self, ConfigIssues> {
        let fail = |issues| ConfigIssues {
            file: file.to_path_buf(),
            issues,
        };
        let mut root: Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![ConfigIssue {
                key: "<syntax>".into(),
                message: syntax_message(text, &e),
            }])
        })?;
        let mut issues = Vec::new();
        for o in overrides {
            if let Err(e) = apply_override(&mut root, o) {
                issues.push(ConfigIssue {
                    key: "--set".into(),
                    message: format!("{:?}: {}", e.text, e.message),
                });
            }
        }
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                issues.push(ConfigIssue {
                    key: shown_key(key),
                    message: format!("unknown section, expected one of {}", SECTIONS.join(", ")),
                });
            }
        }
        if !root.contains_key("data") {
            issues.push(ConfigIssue {
                key: "data".into(),
                message: "missing section: data.train is required".into(),
            });
        }
        let mut cfg = RunConfig::default();
        section(&root, "run", &mut cfg.run, &mut issues);
        section(&root, "model", &mut cfg.model, &mut issues);
        section(&root, "data", &mut cfg.data, &mut issues);
        section(&root, "optim", &mut cfg.optim, &mut issues);
        section(&root, "peft", &mut cfg.peft, &mut issues);
        section(&root, "train", &mut cfg.train, &mut issues);
        section(&root, "dist", &mut cfg.dist, &mut issues);
        section(&root, "checkpoint", &mut cfg.checkpoint, &mut issues);
        section(&root, "logging", &mut cfg.logging, &mut issues);
        if issues.is_empty() {
            let mut found = Vec::new();
            cfg.validate(&mut found);
            issues.extend(
                found
                    .into_iter()
                    .map(|(key, message)| ConfigIssue { key, message }),
            );
        }
        if issues.is_empty() {
            Ok(cfg)
        } else {
            Err(fail(issues))
        }
    }

    /// Checks ranges and combinations across sections; pushes `(dotted key, message)`.
    pub fn validate(&self, out: &mut Vec<(String, String)>) {
        crate::validate::validate(self, out);
        conflicts::check(self, out);
    }

    /// The resolved config as TOML (every default filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// A key as the user would write it: bare when it is a bare TOML key, quoted otherwise (so an
/// empty key shows as `""`, not as nothing; found by the `job_config` fuzz target).
fn shown_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// Deserialises `root[name]` into `slot`, reporting every bad key: after each error the offending
/// key is removed and deserialisation retried, so one pass finds all of them.
fn section<T: DeserializeOwned>(
    root: &Table,
    name: &str,
    slot: &mut T,
    issues: &mut Vec<ConfigIssue>,
) {
    let Some(value) = root.get(name) else { return };
    let Value::Table(table) = value else {
        issues.push(ConfigIssue {
            key: name.into(),
            message: format!("must be a table, got {}", value.type_str()),
        });
        return;
    };
    let mut table = table.clone();
    for _ in 0..64 {
        let de = Value::Table(table.clone());
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) => {
                *slot = v;
                return;
            }
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                let (key_path, message) = unknown_field_path(&path, &inner);
                let full = if key_path == "." || key_path.is_empty() {
                    name.to_string()
                } else {
                    format!("{name}.{key_path}")
                };
                issues.push(ConfigIssue { key: full, message });
                if !remove_path(&mut table, &key_path) {
                    return;
                }
            }
        }
    }
}

/// serde reports an unknown field at the path of its parent; append the field name.
fn unknown_field_path(path: &str, message: &str) -> (String, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            let field = &rest[..end];
            let p = if path == "." || path.is_empty() {
                field.to_string()
            } else if path == field || path.ends_with(&format!(".{field}")) {
                path.to_string()
            } else {
                format!("{path}.{field}")
            };
            return (p, format!("unknown key{}", &rest[end + 1..]));
        }
    }
    (path.to_string(), message.to_string())
}

fn remove_path(table: &mut Table, path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').filter(|p| !p.is_empty()).collect();
    let Some((last, parents)) = parts.split_last() else {
        return false;
    };
    let mut t = table;
    for p in parents {
        match t.get_mut(*p) {
            Some(Value::Table(inner)) => t = inner,
            _ => return false,
        }
    }
    let last = last.split('[').next().unwrap_or(last);
    t.remove(last).is_some()
}

fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().to_string();
    match e.span() {
        Some(span) => {
            // Count bytes, not a `str` slice: a span need not fall on a character boundary.
            let end = span.start.min(text.len());
            let line = text.as_bytes()[..end]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            format!("TOML syntax error at line {line}: {msg}")
        }
        None => format!("TOML syntax error: {msg}"),
    }
}
