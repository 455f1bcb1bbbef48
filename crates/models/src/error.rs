//! The error type of `bellows-models`.

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is malformed, misses a key, or describes an unsupported model.
    #[error("{path}: {key}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The offending key (dotted), or `model_type`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A weights file is malformed, or a tensor is missing, mis-shaped or of an unsupported dtype.
    #[error("{path}: {tensor}: {message}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// The tensor name (or `<header>`).
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A named adapter is unknown, already taken, or does not fit the model.
    #[error("adapter {name:?}: {message}")]
    Adapter {
        /// The adapter name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// An adapter config could not be read or resolved.
    #[error(transparent)]
    Peft(#[from] bellows_peft::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
