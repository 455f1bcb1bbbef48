//! Range and cross-section checks of a [`RunConfig`].

use crate::config::{ParamDtype, Precision, RunConfig, Scheduler};
use crate::device::DeviceSpec;

/// Pushes every problem of `cfg` as `(dotted key, message)`.
pub fn validate(cfg: &RunConfig, out: &mut Vec<(String, String)>) {
    let mut arch_issues = Vec::new();
    let mut bad = |k: &str, m: String| out.push((k.to_string(), m));
    if cfg.run.max_steps == 0 {
        bad("run.max_steps", "must be >= 1, got 0".into());
    }
    if cfg.run.log_every == 0 {
        bad("run.log_every", "must be >= 1, got 0".into());
    }
    if cfg.run.output_dir.as_os_str().is_empty() {
        bad("run.output_dir", "must not be empty".into());
    }
    match (&cfg.model.path, &cfg.model.init) {
        (None, None) => bad(
            "model",
            "set model.path (a Hugging Face folder) or a [model.init] table".into(),
        ),
        (Some(p), _) if !p.join("config.json").is_file() => bad(
            "model.path",
            format!(
                "{} has no config.json (expected a Hugging Face model folder)",
                p.display()
            ),
        ),
        (None, Some(init)) => init.arch().validate("model.init", &mut arch_issues),
        _ => {}
    }
    let o = &cfg.optim;
    if !(o.lr.is_finite() && o.lr > 0.0) {
        bad("optim.lr", format!("must be > 0, got {}", o.lr));
    }
    if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
        bad(
            "optim.weight_decay",
            format!("must be >= 0, got {}", o.weight_decay),
        );
    }
    for (k, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
        if !(0.0..1.0).contains(&v) {
            bad(k, format!("must be in [0, 1), got {v}"));
        }
    }
    if !(o.eps.is_finite() && o.eps > 0.0) {
        bad("optim.eps", format!("must be > 0, got {}", o.eps));
    }
    if !(0.0..=1.0).contains(&o.min_lr_ratio) {
        bad(
            "optim.min_lr_ratio",
            format!("must be in [0, 1], got {}", o.min_lr_ratio),
        );
    }
    if o.scheduler == Scheduler::Constant && o.min_lr_ratio != 0.0 {
        bad(
            "optim.min_lr_ratio",
            "has no effect with scheduler = \"constant\"; remove it".into(),
        );
    }
    if !(o.max_grad_norm.is_finite() && o.max_grad_norm >= 0.0) {
        bad(
            "optim.max_grad_norm",
            format!("must be >= 0 (0 = off), got {}", o.max_grad_norm),
        );
    }
    if o.grad_accum_steps == 0 {
        bad("optim.grad_accum_steps", "must be >= 1, got 0".into());
    }
    match DeviceSpec::parse(&cfg.train.device) {
        Err(m) => bad("train.device", m),
        Ok(DeviceSpec::Cuda(_)) if !cfg!(feature = "cuda") => bad(
            "train.device",
            "this bellows was built without CUDA support; rebuild with `--features cuda`".into(),
        ),
        Ok(_) => {}
    }
    if cfg.train.param_dtype == ParamDtype::Bf16 && cfg.train.precision != Precision::Bf16 {
        bad(
            "train.param_dtype",
            format!(
                "\"bf16\" (pure-bf16 weights) needs train.precision = \"bf16\", got {:?}",
                format!("{:?}", cfg.train.precision).to_lowercase()
            ),
        );
    }
    let ls = &cfg.train.loss_scale;
    if !(ls.init.is_finite() && ls.init > 0.0) {
        bad(
            "train.loss_scale.init",
            format!("must be > 0, got {}", ls.init),
        );
    }
    if !(ls.growth_factor.is_finite() && ls.growth_factor > 1.0) {
        bad(
            "train.loss_scale.growth_factor",
            format!("must be > 1, got {}", ls.growth_factor),
        );
    }
    if !(ls.backoff_factor > 0.0 && ls.backoff_factor < 1.0) {
        bad(
            "train.loss_scale.backoff_factor",
            format!("must be in (0, 1), got {}", ls.backoff_factor),
        );
    }
    if ls.growth_interval == 0 {
        bad(
            "train.loss_scale.growth_interval",
            "must be >= 1, got 0".into(),
        );
    }
    if !(cfg.train.spike_factor.is_finite() && cfg.train.spike_factor >= 0.0) {
        bad(
            "train.spike_factor",
            format!("must be >= 0 (0 = off), got {}", cfg.train.spike_factor),
        );
    }
    if cfg.checkpoint.keep_last == 0 {
        bad("checkpoint.keep_last", "must be >= 1, got 0".into());
    }
    let mut sub = arch_issues;
    cfg.data.validate("data", &mut sub);
    cfg.peft.validate("peft", &mut sub);
    cfg.dist.validate("dist", &mut sub);
    out.extend(sub);
}
