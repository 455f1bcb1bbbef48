//! The error type of `bellows-peft`.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or saving adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed or misses a required key.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key where possible.
        message: String,
    },
    /// A safetensors file is malformed, or a tensor is missing or has the wrong shape.
    #[error("{path}: {message}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        message: String,
    },
    /// The adapter uses a PEFT method bellows does not implement.
    #[error("{path}: unsupported peft_type {peft_type:?} (bellows supports LORA, including rsLoRA and DoRA)")]
    UnsupportedMethod {
        /// The adapter_config.json.
        path: PathBuf,
        /// The `peft_type` found.
        peft_type: String,
    },
    /// A target pattern matched no linear layer of the model.
    #[error("peft.target_modules {pattern:?} matched no linear layer of the model")]
    NoTargetMatched {
        /// The pattern as written.
        pattern: String,
    },
    /// NF4 data or a bitsandbytes quant state that is malformed or inconsistent.
    #[error("invalid NF4 data: {message}")]
    Nf4 {
        /// What is wrong.
        message: String,
    },
    /// An invalid regular expression in the config.
    #[error("{key}: invalid regular expression {pattern:?}: {message}")]
    Regex {
        /// The dotted config key.
        key: String,
        /// The pattern.
        pattern: String,
        /// The parser's message.
        message: String,
    },
    /// Adapters that cannot be combined (`add_weighted_adapter`).
    #[error("cannot combine adapters: {message}")]
    Combine {
        /// Why, naming the adapter property or module.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
