//! Cross-section checks of a [`RunConfig`]: options that are each valid but do not work together,
//! or that would be silently ignored.

use super::RunConfig;
use crate::device::DeviceSpec;

/// Pushes `(dotted key, message)` for every conflicting combination in `cfg`.
pub(crate) fn check(cfg: &RunConfig, out: &mut Vec<(String, String)>) {
    let mut bad = |k: &str, m: String| out.push((k.to_string(), m));
    if cfg.dist.backend == bellows_dist::BackendKind::Nccl
        && matches!(DeviceSpec::parse(&cfg.train.device), Ok(DeviceSpec::Cpu))
    {
        bad(
            "dist.backend",
            "\"nccl\" needs train.device = \"cuda\", got \"cpu\" (use backend = \"cpu\" or \"auto\")"
                .into(),
        );
    }
    if cfg.peft.use_dora && cfg.peft.method == bellows_peft::Method::None {
        bad(
            "peft.use_dora",
            "has no effect with peft.method = \"none\"; set method = \"lora\" or remove it".into(),
        );
    }
    if cfg.data.eval.is_none() {
        for (key, v) in [
            ("run.eval_every", cfg.run.eval_every),
            ("run.eval_max_batches", cfg.run.eval_max_batches),
        ] {
            if v > 0 {
                bad(key, format!("is {v} but data.eval is not set"));
            }
        }
    }
}
