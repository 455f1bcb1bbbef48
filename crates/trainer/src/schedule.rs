//! Learning-rate schedules with linear warmup, as in transformers' `get_*_schedule_with_warmup`.

use crate::config::{OptimConfig, Scheduler};

/// The learning rate for optimizer step `step` (1-based) of `total`.
///
/// Warmup: `lr · step / warmup`. Then, with `p = (step − warmup) / (total − warmup)`:
/// cosine `min + (lr − min)·(1 + cos(πp))/2`, linear `lr − (lr − min)·p`, constant `lr`,
/// where `min = lr · min_lr_ratio`.
pub fn lr_at(cfg: &OptimConfig, step: u64, total: u64) -> f64 {
    let warm = cfg.warmup_steps;
    // transformers evaluates the lambda at the 0-based count of finished steps.
    let s = step.saturating_sub(1);
    if s < warm {
        return cfg.lr * s as f64 / warm.max(1) as f64;
    }
    let min = cfg.lr * cfg.min_lr_ratio;
    let span = total.saturating_sub(warm).max(1) as f64;
    let p = ((s - warm) as f64 / span).min(1.0);
    match cfg.scheduler {
        Scheduler::Constant => cfg.lr,
        Scheduler::Linear => cfg.lr - (cfg.lr - min) * p,
        Scheduler::Cosine => min + (cfg.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: Scheduler, warm: u64, ratio: f64) -> OptimConfig {
        OptimConfig {
            lr: 1.0,
            warmup_steps: warm,
            scheduler: s,
            min_lr_ratio: ratio,
            ..OptimConfig::default()
        }
    }

    #[test]
    fn warmup_rises_linearly_from_zero() {
        let c = cfg(Scheduler::Constant, 4, 0.0);
        let v: Vec<f64> = (1..=6).map(|s| lr_at(&c, s, 10)).collect();
        assert_eq!(v, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    #[test]
    fn cosine_and_linear_follow_transformers_progress() {
        // transformers: progress = finished_steps / total, so step 6 of 10 is half way.
        let c = cfg(Scheduler::Cosine, 0, 0.1);
        assert_eq!(lr_at(&c, 1, 10), 1.0);
        assert!((lr_at(&c, 6, 10) - 0.55).abs() < 1e-12);
        assert!(
            (lr_at(&c, 11, 10) - 0.1).abs() < 1e-12,
            "clamped at the floor"
        );
        let l = cfg(Scheduler::Linear, 0, 0.0);
        assert!((lr_at(&l, 6, 10) - 0.5).abs() < 1e-12);
    }
}
