//! Seeded host-side initialisation, so weights are identical on every rank, backend and thread
//! (burn's own RNG is global per backend and shared by concurrent users).

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic random stream for weight initialisation.
#[derive(Debug, Clone)]
pub struct InitRng(ChaCha8Rng);

impl InitRng {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Self {
        InitRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A tensor of N(mean, std²) values (Box–Muller on the stream).
    pub fn normal<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        mean: f64,
        std: f64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let u1: f64 = 1.0 - self.0.random::<f64>();
            let u2: f64 = self.0.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            v.push((mean + std * r * t.cos()) as f32);
            if v.len() < n {
                v.push((mean + std * r * t.sin()) as f32);
            }
        }
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    /// A tensor of U(lo, hi) values.
    pub fn uniform<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        lo: f64,
        hi: f64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (lo + (hi - lo) * self.0.random::<f64>()) as f32)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn same_seed_same_values_and_plausible_moments() {
        let dev = Default::default();
        let a = InitRng::new(3)
            .normal::<Flex, 1>([10_000], 0.0, 2.0, &dev)
            .into_data();
        let b = InitRng::new(3)
            .normal::<Flex, 1>([10_000], 0.0, 2.0, &dev)
            .into_data();
        assert_eq!(a, b);
        let v = a.to_vec::<f32>().expect("f32");
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        assert!(
            mean.abs() < 0.1 && (var.sqrt() - 2.0).abs() < 0.1,
            "mean {mean} std {}",
            var.sqrt()
        );
    }
}
