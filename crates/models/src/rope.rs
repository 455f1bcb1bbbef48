//! Rotary position embeddings (Su et al. 2021, "RoFormer"), in Hugging Face's non-interleaved
//! "rotate_half" form: `x·cos + rotate_half(x)·sin` with `rotate_half([a, b]) = [-b, a]`.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::config::{ModelArch, RopeScaling};

/// The inverse frequencies `1 / θ^(2i/d)`, with Llama 3 or linear scaling applied.
/// Computed in f32 like transformers' `_compute_default_rope_parameters`.
pub fn inv_freq(arch: &ModelArch) -> Vec<f32> {
    let dim = arch.head_dim;
    let base = arch.rope_theta as f32;
    let mut inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match arch.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= factor as f32),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, lo, hi) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / lo;
            let high_wavelen = old / hi;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen {
                    *f / factor
                } else {
                    *f
                };
                // transformers: ~(wavelen < high) * ~(wavelen > low); wavelengths are finite and positive.
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                *f = if medium {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
    }
    inv
}

/// cos/sin tables for a batch of positions, each `[batch, 1, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// cos(position · inv_freq), duplicated over both halves.
    pub cos: Tensor<B, 4>,
    /// sin(position · inv_freq), duplicated over both halves.
    pub sin: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    /// Builds the tables for `positions` (row-major `[batch, seq]`).
    pub fn new(
        inv_freq: &[f32],
        positions: &[u32],
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> Self {
        let half = inv_freq.len();
        let hd = 2 * half;
        let mut cos = Vec::with_capacity(positions.len() * hd);
        let mut sin = Vec::with_capacity(positions.len() * hd);
        for &p in positions {
            let start = cos.len();
            for &f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let make = |v: Vec<f32>| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [batch, 1, seq, hd]), device)
        };
        RopeTables {
            cos: make(cos),
            sin: make(sin),
        }
    }

    /// Rotates `x: [batch, heads, seq, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, s, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let dtype = x.dtype();
        x * self.cos.clone().cast(dtype) + rotated * self.sin.clone().cast(dtype)
    }
}
