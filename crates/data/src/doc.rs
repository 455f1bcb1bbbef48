//! Checking a raw row and turning it into a document: token ids plus unshifted labels.

use std::path::Path;

use crate::rows::{RawRow, RowData};
use crate::text::TextEncoder;
use crate::{Columns, DataConfig, Error, Result, TokenRef, Truncation};

/// The label value that the loss ignores.
pub const IGNORE_INDEX: i64 = -100;

/// One document: token ids and labels of the same length (labels unshifted, -100 = ignored).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Doc {
    pub tokens: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Turns raw rows into checked documents under one configuration.
pub(crate) struct DocBuilder {
    vocab_size: usize,
    seq_len: usize,
    truncation: Truncation,
    eos: Option<u32>,
    columns: Columns,
    encoder: Option<TextEncoder>,
}

impl DocBuilder {
    /// Loads the tokenizer (if configured) and resolves the EOS token.
    ///
    /// # Errors
    /// A tokenizer that cannot be loaded, an unknown or out-of-range EOS token.
    pub fn new(cfg: &DataConfig, vocab_size: usize) -> Result<Self> {
        let encoder = match &cfg.tokenizer {
            Some(p) => Some(TextEncoder::load(p)?),
            None => None,
        };
        let eos = match (&cfg.eos_token, cfg.add_eos) {
            (Some(t), true) => Some(resolve_token(t, encoder.as_ref())?),
            _ => None,
        };
        let mut issues = Vec::new();
        if let Some(e) = eos.filter(|&e| e as usize >= vocab_size) {
            issues.push((
                "data.eos_token".to_string(),
                format!("id {e} is >= vocab_size {vocab_size}"),
            ));
        }
        if cfg.pad_token_id as usize >= vocab_size {
            issues.push((
                "data.pad_token_id".to_string(),
                format!("{} is >= vocab_size {vocab_size}", cfg.pad_token_id),
            ));
        }
        if !issues.is_empty() {
            return Err(Error::Config(issues));
        }
        Ok(DocBuilder {
            vocab_size,
            seq_len: cfg.seq_len,
            truncation: cfg.truncation,
            eos,
            columns: cfg.columns.clone(),
            encoder,
        })
    }

    /// Checks `row` of `path` and builds its document (EOS appended, truncation applied).
    ///
    /// # Errors
    /// Row-level [`Error::BadRow`]: negative or too large token ids, labels or mask of another length,
    /// a document over `seq_len` under `truncation = "error"`, a tokenizer failure.
    pub fn build(&self, row: RawRow, path: &Path) -> Result<Doc> {
        let r = row.file_row;
        let c = &self.columns;
        let (mut tokens, mut labels, column) = match row.data {
            RowData::Tokens { ids, labels, mask } => {
                let (t, l) = self.tokens_row(ids, labels, mask, path, r)?;
                (t, l, c.input_ids.as_str())
            }
            RowData::Text(text) => {
                let t = self
                    .encoder()?
                    .encode_text(&text)
                    .map_err(|e| Error::bad_row(path, &c.text, r, e))?;
                let l = t.iter().map(|&x| i64::from(x)).collect();
                (t, l, c.text.as_str())
            }
            RowData::PromptCompletion(p, comp) => {
                let (t, l) = self
                    .encoder()?
                    .encode_prompt_completion(&p, &comp)
                    .map_err(|e| Error::bad_row(path, &c.completion, r, e))?;
                (t, l, c.completion.as_str())
            }
        };
        if let Some(pos) = tokens.iter().position(|&t| t as usize >= self.vocab_size) {
            return Err(Error::bad_row(
                path,
                column,
                r,
                format!(
                    "token id {} at position {pos} is >= vocab_size {}",
                    tokens[pos], self.vocab_size
                ),
            ));
        }
        if let Some(eos) = self.eos {
            if tokens.last() != Some(&eos) {
                tokens.push(eos);
                labels.push(i64::from(eos));
            }
        }
        if tokens.len() > self.seq_len {
            match self.truncation {
                Truncation::Truncate => {
                    tokens.truncate(self.seq_len);
                    labels.truncate(self.seq_len);
                }
                Truncation::Split => {}
                Truncation::Error => {
                    return Err(Error::bad_row(
                        path,
                        column,
                        r,
                        format!(
                            "{} tokens is more than seq_len {} (truncation = \"error\")",
                            tokens.len(),
                            self.seq_len
                        ),
                    ))
                }
            }
        }
        Ok(Doc { tokens, labels })
    }

    fn encoder(&self) -> Result<&TextEncoder> {
        self.encoder.as_ref().ok_or_else(|| {
            Error::Config(vec![(
                "data.tokenizer".into(),
                "required for text content".into(),
            )])
        })
    }

    fn tokens_row(
        &self,
        ids: Vec<i64>,
        labels: Option<Vec<i64>>,
        mask: Option<Vec<i64>>,
        path: &Path,
        r: u64,
    ) -> Result<(Vec<u32>, Vec<i64>)> {
        let c = &self.columns;
        for (name, other) in [(&c.labels, &labels), (&c.attention_mask, &mask)] {
            if let Some(o) = other.as_ref().filter(|o| o.len() != ids.len()) {
                return Err(Error::bad_row(
                    path,
                    name,
                    r,
                    format!(
                        "has {} values but {} has {}",
                        o.len(),
                        c.input_ids,
                        ids.len()
                    ),
                ));
            }
        }
        let mut tokens = Vec::with_capacity(ids.len());
        let mut out_labels = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            if let Some(m) = &mask {
                match m[i] {
                    0 => continue,
                    1 => {}
                    v => {
                        return Err(Error::bad_row(
                            path,
                            &c.attention_mask,
                            r,
                            format!("value {v} at position {i} is not 0 or 1"),
                        ))
                    }
                }
            }
            if id < 0 {
                return Err(Error::bad_row(
                    path,
                    &c.input_ids,
                    r,
                    format!("negative token id {id} at position {i}"),
                ));
            }
            if id as u64 >= self.vocab_size as u64 {
                return Err(Error::bad_row(
                    path,
                    &c.input_ids,
                    r,
                    format!(
                        "token id {id} at position {i} is >= vocab_size {}",
                        self.vocab_size
                    ),
                ));
            }
            let label = match &labels {
                Some(l) => l[i],
                None => id,
            };
            if label != IGNORE_INDEX && !(0..self.vocab_size as i64).contains(&label) {
                return Err(Error::bad_row(
                    path,
                    &c.labels,
                    r,
                    format!(
                        "label {label} at position {i} is neither -100 nor in 0..{}",
                        self.vocab_size
                    ),
                ));
            }
            tokens.push(id as u32);
            out_labels.push(label);
        }
        Ok((tokens, out_labels))
    }
}

fn resolve_token(t: &TokenRef, encoder: Option<&TextEncoder>) -> Result<u32> {
    match (t, encoder) {
        (TokenRef::Id(id), _) => Ok(*id),
        (TokenRef::Token(s), Some(enc)) => enc.token_id(s).ok_or_else(|| Error::Tokenizer {
            path: enc.path().to_path_buf(),
            message: format!("eos_token {s:?} is not in the vocabulary"),
        }),
        (TokenRef::Token(s), None) => Err(Error::Config(vec![(
            "data.eos_token".into(),
            format!("{s:?} is a token string, which needs data.tokenizer"),
        )])),
    }
}
