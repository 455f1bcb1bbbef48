//! Run outputs for metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

use crate::tensorboard::EventWriter;
use crate::{Error, Result};

/// One logged training step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Token-weighted mean loss of the step (all micro-batches, all ranks).
    pub loss: f64,
    /// Learning rate used by the step.
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second over the logging window (all ranks).
    pub tokens_per_sec: f64,
    /// Loss-counted tokens seen so far (all ranks).
    pub tokens: u64,
    /// Held-out loss, on steps where evaluation ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// fp16's loss scale after the step (absent for other precisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Steps skipped so far (non-finite gradients, fp16 overflow).
    pub skipped_steps: u64,
}

/// Writes metrics to `metrics.jsonl` and, optionally, TensorBoard.
#[derive(Debug)]
pub struct MetricsSink {
    jsonl: BufWriter<File>,
    tb: Option<EventWriter>,
}

impl MetricsSink {
    /// Opens (appending) `<dir>/metrics.jsonl` and, with `tensorboard`, a new event file in `<dir>/tensorboard`.
    ///
    /// # Errors
    /// The files cannot be created.
    pub fn open(dir: &Path, tensorboard: bool) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let tb_dir = dir.join("tensorboard");
        let tb = if tensorboard {
            Some(EventWriter::create(&tb_dir).map_err(|e| Error::io(&tb_dir, e))?)
        } else {
            None
        };
        Ok(MetricsSink {
            jsonl: BufWriter::new(file),
            tb,
        })
    }

    /// Records one step.
    ///
    /// # Errors
    /// A write fails.
    pub fn log(&mut self, m: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(m).map_err(|e| Error::Internal(e.to_string()))?;
        writeln!(self.jsonl, "{line}").map_err(|e| Error::io(Path::new("metrics.jsonl"), e))?;
        self.jsonl
            .flush()
            .map_err(|e| Error::io(Path::new("metrics.jsonl"), e))?;
        if let Some(tb) = &mut self.tb {
            let path = tb.path().to_path_buf();
            let mut w = |tag: &str, v: f64| {
                tb.scalar(tag, v as f32, m.step)
                    .map_err(|e| Error::io(&path, e))
            };
            w("train/loss", m.loss)?;
            w("train/lr", m.lr)?;
            w("train/grad_norm", m.grad_norm)?;
            w("train/tokens_per_sec", m.tokens_per_sec)?;
            if let Some(e) = m.eval_loss {
                w("eval/loss", e)?;
            }
            if let Some(sc) = m.loss_scale {
                w("train/loss_scale", sc)?;
            }
            w("train/skipped_steps", m.skipped_steps as f64)?;
            tb.flush().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}
