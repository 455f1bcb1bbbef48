//! The Hugging Face causal-LM loss: labels are unshifted, position `t` predicts `labels[t+1]`,
//! `-100` is ignored, and the cross-entropy is computed in f32 and **summed**; callers divide by
//! the token count of the whole step (all micro-batches, all ranks) so gradient accumulation is exact.

use burn::tensor::{activation::log_softmax, backend::Backend, DType, Int, Tensor, TensorData};

/// The label value that is ignored, as in PyTorch's `CrossEntropyLoss(ignore_index=-100)`.
pub const IGNORE_INDEX: i64 = -100;

/// Sum of token cross-entropies and the number of tokens counted.
#[derive(Debug, Clone)]
pub struct LossSum<B: Backend> {
    /// Σ −log p(label) over counted tokens, f32, shape `[1]`.
    pub sum: Tensor<B, 1>,
    /// How many tokens were counted.
    pub tokens: usize,
}

/// Number of positions the loss counts for `labels` (`[batch, seq]`, row-major).
pub fn count_label_tokens(labels: &[i64], batch: usize, seq: usize) -> usize {
    (0..batch)
        .map(|r| {
            labels[r * seq + 1..(r + 1) * seq]
                .iter()
                .filter(|&&l| l != IGNORE_INDEX)
                .count()
        })
        .sum()
}

/// The summed shifted cross-entropy of `logits: [batch, seq, vocab]` against `labels`.
///
/// # Panics
/// If `labels.len() != batch·seq` or a counted label is outside `0..vocab` (the data loader
/// validates ids against the vocabulary before they get here).
pub fn causal_lm_loss_sum<B: Backend>(logits: Tensor<B, 3>, labels: &[i64]) -> LossSum<B> {
    let [b, s, v] = logits.dims();
    assert_eq!(labels.len(), b * s, "labels must be [batch, seq]");
    let n = b * (s - 1);
    let mut targets = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    for r in 0..b {
        for t in 0..s - 1 {
            let l = labels[r * s + t + 1];
            if l == IGNORE_INDEX {
                targets.push(0i64);
                weights.push(0f32);
            } else {
                assert!(
                    (0..v as i64).contains(&l),
                    "label {l} outside vocabulary of {v}"
                );
                targets.push(l);
                weights.push(1f32);
            }
        }
    }
    let tokens = weights.iter().filter(|&&w| w > 0.0).count();
    let sum = match crate::fused::cross_entropy::cross_entropy_sum(logits, &targets, &weights) {
        Ok(sum) => sum,
        Err(logits) => composed_sum(logits, targets, weights),
    };
    LossSum { sum, tokens }
}

/// `Σ w·(−log_softmax(logits)[target])` over the first `s − 1` positions, as burn ops (the
/// path of backends and dtypes `crate::fused::cross_entropy` does not take).
pub(crate) fn composed_sum<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Vec<i64>,
    weights: Vec<f32>,
) -> Tensor<B, 1> {
    let [b, s, v] = logits.dims();
    let device = logits.device();
    let n = b * (s - 1);
    let logits = logits.slice([0..b, 0..s - 1, 0..v]).reshape([n, v]);
    let logits = if logits.dtype() == DType::F32 {
        logits
    } else {
        logits.cast(DType::F32)
    };
    let logp = log_softmax(logits, 1);
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let picked = logp.gather(1, idx).reshape([n]);
    let w = Tensor::<B, 1>::from_data(TensorData::new(weights, [n]), &device);
    (picked * w).sum().neg()
}
