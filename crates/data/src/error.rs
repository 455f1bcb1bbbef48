//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, checking or batching data.
///
/// Row numbers are 0-based data rows within the named file (for JSONL, blank lines are not rows;
/// the 1-based line number is given as well).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The `[data]` section failed validation; each entry is (dotted key, message).
    #[error("invalid data config:\n{}", format_issues(.0))]
    Config(Vec<(String, String)>),
    /// A file pattern matched nothing.
    #[error("pattern {pattern:?} matched no file")]
    NoMatch {
        /// The pattern as written in the config.
        pattern: String,
    },
    /// A file pattern is not a valid glob.
    #[error("invalid file pattern {pattern:?}: {message}")]
    BadPattern {
        /// The pattern as written in the config.
        pattern: String,
        /// What is wrong with it.
        message: String,
    },
    /// An operating-system I/O error on a file.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but holds no bytes or no rows.
    #[error("{path}: file is empty")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a format we read, or is damaged.
    #[error("{path}: corrupt or unsupported file: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        message: String,
    },
    /// A required column is absent.
    #[error("{path}: missing column {column:?} (columns present: {present})")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The configured column name.
        column: String,
        /// The names that are there, comma separated.
        present: String,
    },
    /// A column has a type we cannot use.
    #[error("{path}: column {column:?} has type {found}, expected {expected}")]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// The type found.
        found: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// A single row is unusable (null, bad token id, length mismatch, too long, bad JSON, ...).
    #[error("{path}: column {column:?}, row {row}: {message}")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// 0-based data row within the file.
        row: u64,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer could not be loaded or failed on a row.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The `tokenizer.json` file.
        path: PathBuf,
        /// What the tokenizers crate said.
        message: String,
    },
    /// There is data, but not enough to give every rank one full batch per epoch.
    #[error("{split} data is too small: {detail}")]
    NotEnoughData {
        /// `train` or `eval`.
        split: &'static str,
        /// Counts that explain why.
        detail: String,
    },
    /// A [`LoaderState`](crate::LoaderState) does not fit this data or configuration.
    #[error("cannot resume: {0}")]
    BadState(String),
    /// The loader states given to [`reshard`](crate::reshard) do not fit together or the data.
    #[error("cannot reshard the data loader: the state of old rank {rank}: {message}")]
    Reshard {
        /// The old rank whose state is at fault.
        rank: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The prefetch thread died without reporting an error.
    #[error("prefetch thread stopped: {0}")]
    Prefetch(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn format_issues(issues: &[(String, String)]) -> String {
    issues
        .iter()
        .map(|(k, m)| format!("  {k}: {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &std::path::Path, message: impl std::fmt::Display) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    pub(crate) fn bad_row(
        path: &std::path::Path,
        column: &str,
        row: u64,
        message: impl Into<String>,
    ) -> Self {
        Error::BadRow {
            path: path.to_path_buf(),
            column: column.to_string(),
            row,
            message: message.into(),
        }
    }

    /// Whether `on_error = "skip"` may drop the offending row and go on.
    pub(crate) fn is_row_level(&self) -> bool {
        matches!(self, Error::BadRow { .. })
    }
}
