//! One optimizer update: unscale fp16's loss-scaled gradients, refuse non-finite ones, clip to
//! the global norm (PyTorch's `clip_grad_norm_`), step.

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;

use bellows_models::CausalLm;

use crate::grads;
use crate::precision::LossScaler;

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
    let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let norm = grads::norm_sq(&model, &grads).sqrt() / scale;
    let finite = norm.is_finite();
    let applied = match scaler {
        Some(s) => s.update(!finite),
        None => finite,
    };
    if !applied {
        return (
            model,
            Update {
                grad_norm: norm,
                applied,
            },
        );
    }
    let clip = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    let factor = clip / scale;
    let g = if factor == 1.0 {
        grads
    } else {
        grads::scale(&model, grads, factor)
    };
    (
        optim.step(lr, model, g),
        Update {
            grad_norm: norm,
            applied,
        },
    )
}
