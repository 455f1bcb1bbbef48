//! Autoregressive generation with a KV cache: greedy at temperature 0, otherwise temperature +
//! nucleus (top-p) sampling from a seeded stream.

use burn::tensor::{activation::softmax, backend::Backend, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{CausalLm, KvCache};

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// New tokens to produce at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: sample from the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f64,
    /// Seed of the sampling stream.
    pub seed: u64,
    /// Stop after producing this token (not included in the output), if set.
    pub eos_token_id: Option<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_id: None,
        }
    }
}

/// Picks the next token from `logits` (one row) as `opts` says.
pub fn pick_token(logits: &[f32], opts: &GenerateOptions, rng: &mut impl Rng) -> u32 {
    if opts.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, f64::from(v - max) / opts.temperature))
        .map(|(i, z)| (i, z.exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (k, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= opts.top_p {
            cut = k + 1;
            break;
        }
    }
    let probs = &probs[..cut];
    let mut u = rng.random::<f64>() * probs.iter().map(|p| p.1).sum::<f64>();
    for p in probs {
        u -= p.1;
        if u <= 0.0 {
            return p.0 as u32;
        }
    }
    probs.last().map_or(0, |p| p.0 as u32)
}

/// Generates up to `opts.max_new_tokens` tokens after `prompt` (non-empty) and returns the new tokens.
///
/// # Panics
/// If `prompt` is empty.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &B::Device,
) -> Vec<u32> {
    assert!(!prompt.is_empty(), "generate needs a non-empty prompt");
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut cache = KvCache::new(model.model.layers.len());
    let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    let mut next = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, prompt.len()]), device);
    let mut out = Vec::new();
    for _ in 0..opts.max_new_tokens {
        let logits = model.forward_cached(next, &mut cache);
        let [_, s, v] = logits.dims();
        let last = logits.slice([0..1, s - 1..s, 0..v]).reshape([v]);
        let row: Vec<f32> = last
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let tok = pick_token(&row, opts, &mut rng);
        if opts.eos_token_id == Some(tok) {
            break;
        }
        out.push(tok);
        next =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![i64::from(tok)], [1, 1]), device);
    }
    out
}

/// Next-token probabilities of one logits row (for tests and tools).
pub fn probabilities<B: Backend>(logits: Tensor<B, 1>) -> Tensor<B, 1> {
    softmax(logits, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_p_restricts_the_support() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        assert_eq!(
            pick_token(&logits, &GenerateOptions::default(), &mut rng),
            1
        );
        let opts = GenerateOptions {
            temperature: 1.0,
            top_p: 0.5,
            ..GenerateOptions::default()
        };
        for _ in 0..50 {
            let t = pick_token(&logits, &opts, &mut rng);
            assert!(t == 1 || t == 3, "top-p 0.5 keeps the two largest, got {t}");
        }
        let opts = GenerateOptions {
            temperature: 1.0,
            top_p: 1.0,
            ..GenerateOptions::default()
        };
        let seen: std::collections::HashSet<u32> = (0..400)
            .map(|_| pick_token(&logits, &opts, &mut rng))
            .collect();
        assert_eq!(seen.len(), 4, "full support at top_p 1");
    }
}
