//! The `[dist]` section of the job TOML.

use serde::{Deserialize, Serialize};

/// Which communication backend a [`crate::ProcessGroup`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// NCCL when built with the `cuda` feature and a GPU plus libnccl are present, else the CPU ring.
    #[default]
    Auto,
    /// The TCP ring on host memory (works everywhere).
    Cpu,
    /// NCCL (needs the `cuda` feature, a GPU and libnccl at run time).
    Nccl,
}

/// How work and state are split across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Replicated model, gradients averaged by all-reduce (PyTorch DDP).
    #[default]
    Ddp,
    /// ZeRO stage 1: optimizer state sharded by rows across ranks.
    Zero1,
    /// ZeRO stage 2: optimizer state sharded and gradients reduce-scattered.
    Zero2,
    /// ZeRO stage 3 / FSDP: parameters sharded too, gathered per layer for use.
    Fsdp,
    /// FSDP within a node, replicas across nodes (HSDP): weights sharded over the ranks of a
    /// node, gradients reduce-scattered in the node and all-reduced between nodes.
    Hybrid,
}

fn default_timeout_secs() -> u64 {
    300
}

fn default_bucket_mb() -> f64 {
    25.0
}

/// `[dist]`: distributed settings. Unknown keys are an error.
///
/// ```
/// let cfg: bellows_dist::DistConfig = serde_json::from_str(r#"{"backend": "cpu", "timeout_secs": 30}"#).unwrap();
/// let mut issues = Vec::new();
/// cfg.validate("dist", &mut issues);
/// assert!(issues.is_empty());
/// assert_eq!(cfg.bucket_mb, 25.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// Communication backend: `"auto"` (default), `"cpu"` or `"nccl"`.
    #[serde(default)]
    pub backend: BackendKind,
    /// Every collective and rendezvous step fails after this many seconds without progress. Default 300, range >= 1.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Gradient bucket size for overlapping all-reduce, in MiB. Default 25, range (0, 4096].
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Parallelism strategy: `"ddp"` (default), `"zero1"`, `"zero2"`, `"fsdp"` or `"hybrid"`.
    #[serde(default)]
    pub strategy: Strategy,
    /// FSDP: gather the next layer's weights (and in the backward pass the previous layer's) on
    /// a communication thread while the current layer computes. Default false: on a CPU whose
    /// cores all compute (the usual one rank per core group) the thread only competes with them —
    /// measured 3 % slower and ~40 MiB more per rank (docs/BENCHMARKS.md); turn it on when ranks
    /// have cores or a device to spare.
    #[serde(default = "default_prefetch")]
    pub prefetch: bool,
}

fn default_prefetch() -> bool {
    false
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: BackendKind::default(),
            timeout_secs: default_timeout_secs(),
            bucket_mb: default_bucket_mb(),
            strategy: Strategy::default(),
            prefetch: default_prefetch(),
        }
    }
}

impl DistConfig {
    /// Pushes `(dotted key, message)` for every problem; `at` is this section's dotted path, e.g. `"dist"`.
    pub fn validate(&self, at: &str, out: &mut Vec<(String, String)>) {
        let key = |k: &str| {
            if at.is_empty() {
                k.to_string()
            } else {
                format!("{at}.{k}")
            }
        };
        if self.timeout_secs == 0 {
            out.push((key("timeout_secs"), "must be >= 1, got 0".to_string()));
        }
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0 && self.bucket_mb <= 4096.0) {
            out.push((
                key("bucket_mb"),
                format!("must be in (0, 4096], got {}", self.bucket_mb),
            ));
        }
        if self.backend == BackendKind::Nccl && !cfg!(feature = "cuda") {
            out.push((
                key("backend"),
                "\"nccl\" needs bellows built with the `cuda` feature".to_string(),
            ));
        }
    }

    /// The collective timeout as a [`std::time::Duration`] (at least one second).
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_secs.max(1))
    }

    /// The bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb.max(0.0) * 1024.0 * 1024.0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let cfg: DistConfig = serde_json::from_str("{}").expect("empty section");
        assert_eq!(cfg, DistConfig::default());
        assert_eq!(
            (cfg.timeout_secs, cfg.bucket_mb, cfg.backend, cfg.strategy),
            (300, 25.0, BackendKind::Auto, Strategy::Ddp)
        );
        let err = serde_json::from_str::<DistConfig>(r#"{"bucket": 1}"#).expect_err("unknown key");
        assert!(err.to_string().contains("bucket"), "{err}");
        assert!(serde_json::from_str::<DistConfig>(r#"{"backend": "gloo"}"#).is_err());
    }

    #[test]
    fn validate_reports_every_problem_with_dotted_keys() {
        let cfg = DistConfig {
            timeout_secs: 0,
            bucket_mb: -1.0,
            ..DistConfig::default()
        };
        let mut out = Vec::new();
        cfg.validate("dist", &mut out);
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["dist.timeout_secs", "dist.bucket_mb"]);
    }
}
