//! `bellows eval`: the Hugging Face causal-LM loss of a model folder over a token file.

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::ElementConversion;
use serde::Serialize;

use bellows_data::{Batch, DataConfig, Files, LoaderSpec, Shard, Split, TokenLoader, Truncation};
use bellows_models::{load_pretrained_quantized, CausalLm};
use bellows_peft::{InitRng, LoraPlan, Nf4Options};

use crate::recipe::batch_loss;
use crate::Result;

/// What to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Rows per forward pass.
    pub batch_size: usize,
    /// Stop after this many rows (`None` = all).
    pub max_rows: Option<usize>,
    /// Rows are padded to this length; a longer row is an error naming it (raise the limit).
    pub seq_len: usize,
    /// NF4-quantize the model's decoder linears as they are read (`--quantize nf4`).
    pub quantize: Option<Nf4Options>,
}

/// The result, printed by `bellows eval` as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Token-weighted mean cross-entropy (nats), f32 logits, `-100` labels ignored.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens the loss counted.
    pub tokens: u64,
    /// Rows evaluated.
    pub rows: u64,
}

/// The first `k` rows of a batch.
fn first_rows(b: Batch, k: usize) -> Batch {
    let n = k * b.seq_len;
    Batch {
        batch_size: k,
        seq_len: b.seq_len,
        input_ids: b.input_ids[..n].to_vec(),
        labels: b.labels[..n].to_vec(),
        position_ids: b.position_ids[..n].to_vec(),
        segment_ids: b.segment_ids[..n].to_vec(),
        state_after: b.state_after,
    }
}

/// Evaluates `model` (any backend without autodiff) on `data`.
///
/// # Errors
/// Unreadable or invalid data (naming file, column and row).
pub fn evaluate_model(
    model: &CausalLm<Flex>,
    vocab_size: usize,
    data: &Path,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let files = Files::One(data.display().to_string());
    let mut cfg = DataConfig::new(files.clone());
    cfg.eval = Some(files);
    cfg.seq_len = opts.seq_len;
    cfg.batch_size = opts.batch_size;
    cfg.truncation = Truncation::Error;
    let spec = LoaderSpec {
        split: Split::Eval,
        shard: Shard { rank: 0, world: 1 },
        seed: 0,
        vocab_size,
    };
    let mut loader = TokenLoader::new(&cfg, spec)?;
    let device = Default::default();
    let (mut sum, mut tokens, mut rows) = (0f64, 0u64, 0u64);
    while let Some(batch) = loader.next_batch()? {
        let left = opts
            .max_rows
            .map_or(usize::MAX, |m| m.saturating_sub(rows as usize));
        if left == 0 {
            break;
        }
        let batch = if batch.batch_size > left {
            first_rows(batch, left)
        } else {
            batch
        };
        let (s, t) = batch_loss(model, &batch, &device, None);
        sum += s.into_scalar().elem::<f64>();
        tokens += t as u64;
        rows += batch.batch_size as u64;
    }
    let loss = if tokens > 0 {
        sum / tokens as f64
    } else {
        f64::NAN
    };
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
        rows,
    })
}

/// Loads the Hugging Face folder `model_dir` (with a PEFT `adapter` folder on top, if given)
/// and evaluates it on `data`.
///
/// # Errors
/// Model, adapter or data problems, naming the file.
pub fn evaluate_dir(
    model_dir: &Path,
    adapter: Option<&Path>,
    data: &Path,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let device = Default::default();
    let q = opts.quantize;
    let (arch, model) = match adapter {
        Some(a) => {
            let (arch, _, m) = bellows_models::load_pretrained_with_adapter_quantized::<Flex>(
                model_dir, a, q, &device,
            )?;
            (arch, m)
        }
        None => {
            let none = LoraPlan::none();
            load_pretrained_quantized::<Flex>(model_dir, &none, q, &mut InitRng::new(0), &device)?
        }
    };
    evaluate_model(&model, arch.vocab_size, data, opts)
}
