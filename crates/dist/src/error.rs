//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong in `bellows-dist`.
///
/// Messages are lowercase and name the thing that failed: the variable, the op, the rank(s), the address.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A launch environment variable is missing, malformed or inconsistent with another one.
    #[error("launch environment: {var}: {message}")]
    Env {
        /// The variable at fault (or the first of several that disagree).
        var: String,
        /// What is wrong with it.
        message: String,
    },

    /// An invalid `[dist]` configuration (see [`crate::DistConfig::validate`]).
    #[error("invalid dist config: {0}")]
    Config(String),

    /// A socket operation against an address failed (bind, connect, accept).
    #[error("{what} {addr}: {source}")]
    Io {
        /// What was being done, e.g. "bind store on".
        what: &'static str,
        /// The address involved.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The rendezvous store refused us, sent garbage or failed.
    #[error("store {addr}: {message}")]
    Store {
        /// The store address.
        addr: String,
        /// What went wrong.
        message: String,
    },

    /// A store request did not complete in time.
    #[error("store {addr}: {op} {key:?} timed out after {secs:.1} s")]
    StoreTimeout {
        /// The store address.
        addr: String,
        /// The request ("get", "wait", "barrier").
        op: &'static str,
        /// The key (or barrier name) waited for.
        key: String,
        /// The timeout that expired, in seconds.
        secs: f64,
    },

    /// A collective failed because of a peer (closed connection, I/O error, abort from another rank).
    #[error("{op} on rank {rank}: peer rank {peer}: {message}")]
    Peer {
        /// The collective ("all_reduce", "broadcast", ...).
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// The peer involved.
        peer: usize,
        /// What happened.
        message: String,
    },

    /// A collective did not complete within the configured timeout.
    #[error("{op} on rank {rank}: timed out after {secs:.1} s waiting for rank {peer}")]
    Timeout {
        /// The collective.
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// The rank we were waiting on.
        peer: usize,
        /// The timeout, in seconds.
        secs: f64,
    },

    /// Ranks called different collectives, or the same one with different sizes or element types.
    #[error("{op} on rank {rank}: mismatch with rank {peer}: {message}")]
    Mismatch {
        /// The collective called on this rank.
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// The peer that disagrees.
        peer: usize,
        /// What differs.
        message: String,
    },

    /// A peer runs a different job (its job hash differs from ours).
    #[error("rank {peer} has job hash {theirs:?} but rank {rank} has {ours:?}: refusing to form a group")]
    JobHashMismatch {
        /// The rank compared against (rank 0, which checks everyone).
        rank: usize,
        /// The rank that differs.
        peer: usize,
        /// Our hash.
        ours: String,
        /// Theirs.
        theirs: String,
    },

    /// Bad arguments to a collective (lengths, root out of range).
    #[error("{op} on rank {rank}: {message}")]
    InvalidArgument {
        /// The collective.
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// What is wrong.
        message: String,
    },

    /// The group is unusable after an earlier collective failed part-way.
    #[error("process group on rank {rank} is broken by an earlier failure: {first}")]
    Broken {
        /// This process's rank.
        rank: usize,
        /// The first error.
        first: String,
    },

    /// The requested backend is not available in this build or on this machine.
    #[error("backend {backend:?} unavailable: {message}")]
    BackendUnavailable {
        /// The backend name.
        backend: String,
        /// Why.
        message: String,
    },

    /// NCCL failed.
    #[error("nccl {op} on rank {rank}: {message}")]
    Nccl {
        /// The NCCL call.
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// The NCCL / CUDA error text.
        message: String,
    },

    /// Converting a burn tensor to or from host memory failed.
    #[error("tensor {op}: {message}")]
    Tensor {
        /// The helper.
        op: &'static str,
        /// What went wrong.
        message: String,
    },

    /// The launcher could not start or supervise a worker.
    #[error("launch: {message}")]
    Launch {
        /// What went wrong.
        message: String,
    },

    /// A worker exited unsuccessfully (all other workers were then stopped).
    #[error("launch: rank {rank} failed ({status}){restarts}")]
    WorkerFailed {
        /// The global rank of the first worker that failed.
        rank: usize,
        /// Its exit status, in words.
        status: String,
        /// Restart information, e.g. " after 2 restarts".
        restarts: String,
    },

    /// The launcher received SIGINT/SIGTERM, forwarded it to the workers and stopped them.
    #[error("launch: interrupted by signal {signal}")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },

    /// A file needed by the library could not be found or read.
    #[error("{path}: {message}")]
    File {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn env(var: &str, message: impl Into<String>) -> Self {
        Error::Env {
            var: var.to_string(),
            message: message.into(),
        }
    }
}
