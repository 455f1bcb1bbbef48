//! AdamW as one parallel, vectorised pass per parameter on the CPU backend.
//!
//! burn 0.21's `AdamW` runs about fifteen whole-tensor ops per parameter (each a pass over it,
//! with its own allocation, single-threaded on Flex): a fifth of a full fine-tune's step on the
//! small bench model went there while the second thread idled. [`FusedAdamW`] computes the same
//! f32 operations in the same order per element (`Consts::update`) in one pass, so its results
//! equal burn's to the bit, and keeps burn's state type (`AdamWState`), so the optimizer record
//! and the checkpoints are unchanged. Off Flex, or for a tensor that is not f32, it hands the
//! step to burn's `AdamW`. The ZeRO optimizer ([`crate::zero`]) updates its rows with the same
//! `Consts::update`.

use burn::backend::Flex;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use bellows_peft::fused::simd::wide;
use bellows_peft::fused::{f32_slice, on_backend};

use crate::zero::AdamWParams;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// AdamW (decoupled weight decay, bias-corrected moments; no AMSGrad) with burn's arithmetic,
/// fused on Flex.
#[derive(Clone)]
pub struct FusedAdamW {
    hp: AdamWParams,
    plain: AdamW,
}

impl std::fmt::Debug for FusedAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedAdamW").field("hp", &self.hp).finish()
    }
}

impl FusedAdamW {
    /// An optimizer with hyper-parameters `hp`.
    pub fn new(hp: AdamWParams) -> Self {
        let plain = AdamWConfig::new()
            .with_beta_1(hp.beta1)
            .with_beta_2(hp.beta2)
            .with_epsilon(hp.eps)
            .with_weight_decay(hp.weight_decay)
            .build();
        FusedAdamW { hp, plain }
    }

    /// The optimizer for module `M`'s parameters (burn's adaptor, which keeps one state per
    /// parameter).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }

    /// The step on Flex tensors: fused when everything is f32 and contiguous-able, else burn's.
    fn flex_step<const D: usize>(
        &self,
        lr: LearningRate,
        p: Tensor<Flex, D>,
        g: Tensor<Flex, D>,
        state: Option<AdamWState<Flex, D>>,
    ) -> (Tensor<Flex, D>, Option<AdamWState<Flex, D>>) {
        let f32s = p.dtype() == DType::F32
            && g.dtype() == DType::F32
            && state.as_ref().is_none_or(|s| {
                let m = &s.momentum;
                m.moment_1.dtype() == DType::F32
                    && m.moment_2.dtype() == DType::F32
                    && m.max_moment_2.is_none()
            });
        if !f32s {
            return self.plain.step(lr, p, g, state);
        }
        let shape = p.shape();
        // burn's first step is the one without a state (a loaded state of step 0 is not).
        let first = state.is_none();
        let (time, mut m, mut v) = match state {
            Some(s) => {
                let m = s.momentum;
                (m.time, host(m.moment_1), host(m.moment_2))
            }
            None => {
                let zeros = || FlexTensor::zeros(shape.clone(), DType::F32);
                (0, zeros(), zeros())
            }
        };
        let (mut p, g) = (host(p), host(g));
        let c = Consts::new(&self.hp, lr, time + 1);
        // In place where this step holds the only reference (else `storage_mut` copies first).
        c.apply(
            p.storage_mut(),
            f32_slice(&g),
            (m.storage_mut(), v.storage_mut()),
            first,
        );
        let t = |x: FlexTensor| Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(x));
        let momentum = AdaptiveMomentumState::new(time + 1, t(m), t(v));
        (t(p), Some(AdamWState::new(momentum)))
    }
}

/// The contiguous Flex tensor of `t`, its storage exactly its elements.
fn host<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => p.to_contiguous(),
        TensorPrimitive::QFloat(_) => unreachable!("dtype checked to be f32"),
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        type FlexStep<const D: usize> = (
            Tensor<Flex, D>,
            Tensor<Flex, D>,
            Option<AdamWState<Flex, D>>,
        );
        match on_backend((tensor, grad, state), |(p, g, s): FlexStep<D>| {
            self.flex_step(lr, p, g, s)
        }) {
            Ok(out) => out,
            Err((p, g, s)) => self.plain.step(lr, p, g, s),
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

/// One step's constants: burn's `AdamW` scalars, each rounded to f32 where burn's scalar ops
/// round it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Consts {
    b1: f32,
    b2: f32,
    f1: f32,
    f2: f32,
    /// Bias corrections `1 − βᵢᵗ`.
    c1: f32,
    c2: f32,
    eps: f32,
    /// `1 − lr·weight_decay`, or `None` without decay (burn then leaves `p` unscaled).
    keep: Option<f32>,
    lr: f32,
    /// Each gradient's factor before the update (ZeRO's clipping factor; 1 elsewhere, exact).
    grad_scale: f32,
}

impl Consts {
    /// The constants of step `t` (1 for the first) at learning rate `lr`.
    pub(crate) fn new(hp: &AdamWParams, lr: f64, t: usize) -> Self {
        let (b1, b2) = (hp.beta1, hp.beta2);
        let t = t as i32;
        let decay = lr * f64::from(hp.weight_decay);
        Consts {
            b1,
            b2,
            f1: 1.0 - b1,
            f2: 1.0 - b2,
            c1: 1f32 - b1.powi(t),
            c2: 1f32 - b2.powi(t),
            eps: hp.eps,
            keep: (decay != 0.0).then_some((1.0 - decay) as f32),
            lr: lr as f32,
            grad_scale: 1.0,
        }
    }

    /// The same constants for gradients multiplied by `factor` first.
    pub(crate) fn with_grad_scale(self, factor: f32) -> Self {
        Consts {
            grad_scale: factor,
            ..self
        }
    }

    /// One element: `(p', m', v')` from the parameter, its gradient (times the gradient scale)
    /// and its moments (`None` on the first step), in burn's order of f32 operations.
    #[inline(always)]
    pub(crate) fn update(&self, p: f32, g: f32, mv: Option<(f32, f32)>) -> (f32, f32, f32) {
        let g = g * self.grad_scale;
        let (m, v) = match mv {
            None => (g * self.f1, (g * g) * self.f2),
            Some((m, v)) => (m * self.b1 + g * self.f1, v * self.b2 + (g * g) * self.f2),
        };
        let delta = (m / self.c1) / ((v / self.c2).sqrt() + self.eps);
        let decayed = match self.keep {
            Some(k) => p * k,
            None => p,
        };
        (decayed - delta * self.lr, m, v)
    }

    /// [`Consts::update`] over whole slices in place, in parallel chunks: `p`, `m` and `v`
    /// updated from `g` (on the `first` step the moments' old values are not read).
    ///
    /// # Panics
    /// If the slices' lengths differ.
    pub(crate) fn apply(
        &self,
        p: &mut [f32],
        g: &[f32],
        (m, v): (&mut [f32], &mut [f32]),
        first: bool,
    ) {
        let n = p.len();
        assert!(
            g.len() == n && m.len() == n && v.len() == n,
            "AdamW operands of different lengths"
        );
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                wide(
                    #[inline(always)]
                    || self.chunk(p, g, m, v, first),
                )
            });
    }

    /// [`Consts::apply`] on one chunk (inlined into [`wide`]'s AVX-512 build).
    #[inline(always)]
    fn chunk(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], first: bool) {
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
        if first {
            for i in 0..n {
                (p[i], m[i], v[i]) = self.update(p[i], g[i], None);
            }
        } else {
            for i in 0..n {
                (p[i], m[i], v[i]) = self.update(p[i], g[i], Some((m[i], v[i])));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::{Module, Param};
    use burn::optim::adaptor::OptimizerAdaptor;
    use burn::optim::{AdamWConfig, AdamWState, GradientsParams, Optimizer, SimpleOptimizer};
    use burn::tensor::{Tensor, TensorData};

    use super::FusedAdamW;
    use crate::zero::AdamWParams;

    type Ad = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Two<B: burn::tensor::backend::Backend> {
        a: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 377.0)
            .collect()
    }

    fn model() -> Two<Ad> {
        let dev = Default::default();
        // Larger than one task, so the parallel chunks meet.
        let a = Tensor::<Ad, 2>::from_data(TensorData::new(values(300 * 70, 1), [300, 70]), &dev);
        let b = Tensor::<Ad, 1>::from_data(TensorData::new(values(33, 2), [33]), &dev);
        Two {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
        }
    }

    fn grads(m: &Two<Ad>, step: usize) -> GradientsParams {
        let dev = Default::default();
        let c = Tensor::<Ad, 2>::from_data(
            TensorData::new(values(300 * 70, 10 + step), [300, 70]),
            &dev,
        );
        let loss = (m.a.val() * c).sum() + (m.b.val() * m.b.val()).sum().mul_scalar(0.3);
        GradientsParams::from_grads(loss.backward(), m)
    }

    fn bits(m: &Two<Ad>) -> Vec<u32> {
        let mut v = m.a.val().into_data().to_vec::<f32>().expect("f32");
        v.extend(m.b.val().into_data().to_vec::<f32>().expect("f32"));
        v.into_iter().map(f32::to_bits).collect()
    }

    /// Every parameter's `(time, m, v)` bits from an optimizer's record.
    fn moments<O, M>(
        m: &Two<Ad>,
        opt: &OptimizerAdaptor<O, M, Ad>,
    ) -> Vec<(usize, Vec<u32>, Vec<u32>)>
    where
        O: SimpleOptimizer<Flex, State<1> = AdamWState<Flex, 1>>
            + SimpleOptimizer<Flex, State<2> = AdamWState<Flex, 2>>,
        M: burn::module::AutodiffModule<Ad>,
    {
        let rec = opt.to_record();
        let b = |t: Tensor<Flex, 2>| -> Vec<u32> {
            t.into_data()
                .to_vec::<f32>()
                .expect("f32")
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        let sa: AdamWState<Flex, 2> = rec[&m.a.id].clone().into_state::<2>();
        let sb: AdamWState<Flex, 1> = rec[&m.b.id].clone().into_state::<1>();
        vec![
            (
                sa.momentum.time,
                b(sa.momentum.moment_1),
                b(sa.momentum.moment_2),
            ),
            (
                sb.momentum.time,
                b(sb.momentum.moment_1.unsqueeze()),
                b(sb.momentum.moment_2.unsqueeze()),
            ),
        ]
    }

    /// Four steps of the fused optimizer and of burn's AdamW end in the same parameters and
    /// moments, bit for bit, with and without weight decay.
    #[test]
    fn fused_adamw_is_burns_adamw_to_the_bit() {
        for weight_decay in [0.0f32, 0.1] {
            let hp = AdamWParams {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay,
            };
            let mut burn_opt = AdamWConfig::new()
                .with_beta_1(hp.beta1)
                .with_beta_2(hp.beta2)
                .with_epsilon(hp.eps)
                .with_weight_decay(hp.weight_decay)
                .init::<Ad, Two<Ad>>();
            let mut fused = FusedAdamW::new(hp).init::<Ad, Two<Ad>>();
            let (mut x, mut y) = (model(), model());
            for step in 0..4 {
                let lr = 1e-2 / (step + 1) as f64;
                let (gx, gy) = (grads(&x, step), grads(&y, step));
                x = burn_opt.step(lr, x, gx);
                y = fused.step(lr, y, gy);
                assert_eq!(bits(&x), bits(&y), "step {step}, decay {weight_decay}");
            }
            assert_eq!(
                moments(&x, &burn_opt),
                moments(&y, &fused),
                "decay {weight_decay}"
            );
        }
    }
}
