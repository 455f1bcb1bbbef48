//! One micro-batch and how rows are laid out in it.

use crate::doc::IGNORE_INDEX;
use crate::LoaderState;

/// One micro-batch, row-major `[batch_size, seq_len]` flattened.
///
/// Labels follow the Hugging Face causal-LM convention: they are **unshifted**, the model shifts
/// (position `t` predicts `labels[t + 1]`), and -100 means ignored: padding, masked prompt tokens and
/// the first token of every packed document that does not start its row, so the shift never
/// crosses a document boundary.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Rows.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Token ids; padded positions hold `pad_token_id`.
    pub input_ids: Vec<u32>,
    /// Unshifted labels, -100 = ignored.
    pub labels: Vec<i64>,
    /// Position within the document, restarting at 0 at every document; 0 at padding.
    pub position_ids: Vec<u32>,
    /// 0 = padding, 1.. = document index within the row; attention must not cross segments.
    pub segment_ids: Vec<u32>,
    /// The loader state right after this batch, so a prefetching consumer checkpoints what it consumed.
    pub state_after: LoaderState,
}

impl Batch {
    /// Number of positions `t` in `0..seq_len - 1` with `labels[t + 1] != -100`: the tokens the loss counts.
    ///
    /// Sum it over micro-batches and ranks to normalise a gradient-accumulated loss.
    pub fn label_tokens(&self) -> usize {
        self.labels
            .chunks(self.seq_len.max(1))
            .map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }
}

/// Batch contents while they are being filled.
pub(crate) struct BatchBuf {
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
}

impl BatchBuf {
    pub fn new(batch_size: usize, seq_len: usize) -> Self {
        let n = batch_size * seq_len;
        BatchBuf {
            seq_len,
            input_ids: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            position_ids: Vec::with_capacity(n),
            segment_ids: Vec::with_capacity(n),
        }
    }

    /// Appends one document piece as segment `segment`, positions from 0.
    /// `mask_first` sets the first label to -100 (a document start inside a packed row).
    pub fn push_piece(&mut self, tokens: &[u32], labels: &[i64], segment: u32, mask_first: bool) {
        for (i, (&t, &l)) in tokens.iter().zip(labels).enumerate() {
            self.input_ids.push(t);
            self.labels.push(if i == 0 && mask_first {
                IGNORE_INDEX
            } else {
                l
            });
            self.position_ids.push(i as u32);
            self.segment_ids.push(segment);
        }
    }

    /// Pads with `pad` until `rows` full rows are written.
    pub fn pad_to_rows(&mut self, rows: usize, pad: u32) {
        while self.input_ids.len() < rows * self.seq_len {
            self.input_ids.push(pad);
            self.labels.push(IGNORE_INDEX);
            self.position_ids.push(0);
            self.segment_ids.push(0);
        }
    }

    pub fn finish(self, batch_size: usize, state_after: LoaderState) -> Batch {
        Batch {
            batch_size,
            seq_len: self.seq_len,
            input_ids: self.input_ids,
            labels: self.labels,
            position_ids: self.position_ids,
            segment_ids: self.segment_ids,
            state_after,
        }
    }
}
