//! The error type of `bellows-trainer`; wraps the lower crates' errors.

use std::path::{Path, PathBuf};

/// Everything that can stop a training job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job file is invalid (every problem listed).
    #[error("{0}")]
    Config(#[from] crate::config::ConfigIssues),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Model loading or saving failed.
    #[error(transparent)]
    Model(#[from] bellows_models::Error),
    /// Adapter handling failed.
    #[error(transparent)]
    Peft(#[from] bellows_peft::Error),
    /// The data pipeline failed.
    #[error(transparent)]
    Data(#[from] bellows_data::Error),
    /// A collective or the rendezvous failed.
    #[error(transparent)]
    Dist(#[from] bellows_dist::Error),
    /// A collective failed inside an FSDP forward or backward pass (found after the pass).
    #[error("fsdp: a collective failed during the forward/backward pass: {0}")]
    ShardedPass(String),
    /// The training data yielded no batch.
    #[error("data.train yielded no batch: the files contain no usable rows")]
    NoData,
    /// A step's loss or gradients were NaN/Inf under `train.on_nonfinite = "stop"`.
    #[error("step {step}: non-finite {what}; stopped (train.on_nonfinite = \"stop\") after saving {checkpoint}")]
    NonFinite {
        /// The step.
        step: u64,
        /// What was non-finite, e.g. `gradient norm NaN`.
        what: String,
        /// The checkpoint written before stopping.
        checkpoint: PathBuf,
    },
    /// The selected device cannot be used.
    #[error("train.device {device:?}: {message}")]
    Device {
        /// The device string.
        device: String,
        /// Why it cannot be used.
        message: String,
    },
    /// A checkpoint could not be written.
    #[error("cannot write checkpoint file {path}: {message}")]
    CheckpointWrite {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A checkpoint file is damaged: missing, truncated, altered or not what it should be.
    #[error("checkpoint file {file}: {message}")]
    CheckpointCorrupt {
        /// The file.
        file: PathBuf,
        /// What is wrong, e.g. the expected and found hash.
        message: String,
    },
    /// A checkpoint is intact but belongs to another job or topology.
    #[error("cannot resume from {dir}: {message}")]
    CheckpointMismatch {
        /// The checkpoint folder.
        dir: PathBuf,
        /// What differs.
        message: String,
    },
    /// A broken internal invariant (a bug); the message says which.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
