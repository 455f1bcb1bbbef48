//! One optimizer update: unscale fp16's loss-scaled gradients, refuse non-finite ones, clip to
//! the global norm (PyTorch's `clip_grad_norm_`), step.

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;

use bellows_models::CausalLm;

use bellows_dist::ProcessGroup;

use crate::grads;
use crate::precision::LossScaler;
use crate::zero::ZeroAdamW;

/// What [`apply`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Update {
    /// The true (unscaled) global gradient norm before clipping; NaN/Inf when non-finite.
    pub grad_norm: f64,
    /// Whether the optimizer stepped (false: the step was skipped).
    pub applied: bool,
}

/// Applies `grads` (already summed across ranks, so every rank decides alike) to `model`.
/// With a `scaler`, the gradients carry its scale: they are divided by it, and an overflow
/// skips the step and backs the scale off. Without one, a non-finite norm skips the step too;
/// the caller applies `train.on_nonfinite`.
pub(crate) fn apply<B, O>(
    model: CausalLm<B>,
    optim: &mut O,
    grads: GradientsParams,
    lr: f64,
    max_norm: f64,
    scaler: Option<&mut LossScaler>,
) -> (CausalLm<B>, Update)
where
    B: AutodiffBackend,
    O: Optimizer<CausalLm<B>, B>,
{
    let raw = grads::norm_sq(&model, &grads).sqrt();
    let (norm, factor) = decide(raw, max_norm, scaler);
    let Some(factor) = factor else {
        return (
            model,
            Update {
                grad_norm: norm,
                applied: false,
            },
        );
    };
    let g = if factor == 1.0 {
        grads
    } else {
        grads::scale(&model, grads, factor)
    };
    (
        optim.step(lr, model, g),
        Update {
            grad_norm: norm,
            applied: true,
        },
    )
}

/// The same update with ZeRO's sharded optimizer (`grads` are this rank's, all-reduced for
/// stage 1, local for stage 2).
///
/// # Errors
/// A collective fails.
pub(crate) fn apply_zero<B: AutodiffBackend>(
    model: CausalLm<B>,
    zero: &mut ZeroAdamW,
    grads: &GradientsParams,
    pg: &ProcessGroup,
    lr: f64,
    max_norm: f64,
    scaler: Option<&mut LossScaler>,
) -> crate::Result<(CausalLm<B>, Update)> {
    let mut outcome = Update {
        grad_norm: f64::NAN,
        applied: false,
    };
    let (model, _) = zero.step(model, grads, pg, lr, |raw| {
        let (norm, factor) = decide(raw, max_norm, scaler);
        outcome = Update {
            grad_norm: norm,
            applied: factor.is_some(),
        };
        factor
    })?;
    Ok((model, outcome))
}

/// From the raw (still loss-scaled) global norm: the true norm, and the factor to multiply the
/// gradients by (unscale × clip), or `None` to skip the step.
fn decide(raw: f64, max_norm: f64, scaler: Option<&mut LossScaler>) -> (f64, Option<f64>) {
    let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let norm = raw / scale;
    let finite = norm.is_finite();
    let applied = match scaler {
        Some(s) => s.update(!finite),
        None => finite,
    };
    if !applied {
        return (norm, None);
    }
    let clip = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    (norm, Some(clip / scale))
}
