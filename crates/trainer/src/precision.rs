//! Mixed precision: the compute dtype that `train.precision` selects, and fp16's dynamic loss
//! scaler (the algorithm of PyTorch's `GradScaler`).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::Backend, DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{LossScaleSection, Precision};

/// The matmul dtype of a precision: `None` for f32 (everything in the weights' dtype).
pub fn compute_dtype(p: Precision) -> Option<DType> {
    match p {
        Precision::F32 => None,
        Precision::Bf16 => Some(DType::BF16),
        Precision::Fp16 => Some(DType::F16),
    }
}

/// Casts every float parameter of `module` to `dtype`, keeping ids and trainability: pure
/// low-precision training (`train.param_dtype = "bf16"`), where the optimizer state follows the
/// parameters' dtype.
pub fn cast_params<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    struct Cast(DType);
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let grad = p.is_require_grad();
            let id = p.id;
            let t = bellows_peft::in_dtype(p.val().detach(), self.0).detach();
            Param::initialized(id, t).set_require_grad(grad)
        }
    }
    module.map(&mut Cast(dtype))
}

/// Dynamic loss scaling for fp16: the loss is multiplied by `scale` before the backward pass so
/// small gradients survive f16's range; gradients are divided by it before the update. A step
/// whose gradients overflow is skipped and the scale backs off; after `growth_interval` clean
/// steps in a row it grows. Checkpointed with the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Multiplier after `growth_interval` clean steps.
    pub growth_factor: f64,
    /// Multiplier after an overflow.
    pub backoff_factor: f64,
    /// Clean steps between growths.
    pub growth_interval: u64,
    /// Clean steps since the last growth or overflow.
    pub growth_tracker: u64,
    /// Steps skipped for overflow so far.
    pub skipped: u64,
}

impl LossScaler {
    /// A scaler as `[train.loss_scale]` configures it.
    pub fn new(c: &LossScaleSection) -> Self {
        LossScaler {
            scale: c.init,
            growth_factor: c.growth_factor,
            backoff_factor: c.backoff_factor,
            growth_interval: c.growth_interval,
            growth_tracker: 0,
            skipped: 0,
        }
    }

    /// Records a step's outcome and adjusts the scale; returns whether the optimizer may step
    /// (false when the gradients overflowed).
    pub fn update(&mut self, found_inf: bool) -> bool {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            self.skipped += 1;
            return false;
        }
        self.growth_tracker += 1;
        if self.growth_tracker >= self.growth_interval {
            self.scale *= self.growth_factor;
            self.growth_tracker = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler(interval: u64) -> LossScaler {
        LossScaler::new(&LossScaleSection {
            growth_interval: interval,
            ..LossScaleSection::default()
        })
    }

    #[test]
    fn overflow_skips_and_backs_off() {
        let mut s = scaler(2000);
        assert_eq!(s.scale, 65536.0);
        assert!(!s.update(true));
        assert_eq!((s.scale, s.skipped, s.growth_tracker), (32768.0, 1, 0));
        assert!(!s.update(true));
        assert_eq!((s.scale, s.skipped), (16384.0, 2));
    }

    #[test]
    fn grows_after_interval_clean_steps_only() {
        let mut s = scaler(3);
        assert!(s.update(false));
        assert!(s.update(false));
        assert_eq!(s.scale, 65536.0);
        assert!(s.update(false));
        assert_eq!((s.scale, s.growth_tracker), (131072.0, 0));
        // An overflow resets the count of clean steps.
        s.update(false);
        s.update(false);
        s.update(true);
        s.update(false);
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker, s.skipped), (65536.0, 2, 1));
    }

    #[test]
    fn matches_torch_grad_scaler_trace() {
        // torch.amp.GradScaler("cpu", init_scale=8, growth_factor=2, backoff_factor=0.5,
        // growth_interval=2) fed inf, ok, ok, ok, inf, ok: scale after each update()
        // is 4, 4, 8, 8, 4, 4 (run with torch 2.15 on 2026-11-30).
        let mut s = LossScaler::new(&LossScaleSection {
            init: 8.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2,
        });
        let got: Vec<f64> = [true, false, false, false, true, false]
            .iter()
            .map(|&inf| {
                s.update(inf);
                s.scale
            })
            .collect();
        assert_eq!(got, [4.0, 4.0, 8.0, 8.0, 4.0, 4.0]);
    }

    #[test]
    fn precision_maps_to_compute_dtype() {
        assert_eq!(compute_dtype(Precision::F32), None);
        assert_eq!(compute_dtype(Precision::Bf16), Some(DType::BF16));
        assert_eq!(compute_dtype(Precision::Fp16), Some(DType::F16));
    }
}
