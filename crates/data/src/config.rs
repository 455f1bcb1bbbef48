//! The `[data]` section of the job TOML.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One file pattern or a list of them.
///
/// Each entry is a path, a glob (`data/train-*.parquet`, matched with the `glob` crate, results sorted),
/// or a Hugging Face `datasets` `save_to_disk` folder (one holding `state.json`).
/// In TOML: `train = "a.parquet"` or `train = ["a.parquet", "more/*.arrow"]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum Files {
    /// A single path or pattern.
    One(String),
    /// Several paths or patterns, read in this order (before any shuffle).
    Many(Vec<String>),
}

impl Files {
    /// The patterns as a slice.
    pub fn patterns(&self) -> &[String] {
        match self {
            Files::One(p) => std::slice::from_ref(p),
            Files::Many(v) => v,
        }
    }
}

/// What each row holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// Pre-tokenized: an `input_ids` list column, optional `labels` and `attention_mask`.
    #[default]
    Tokens,
    /// A `text` string column, tokenized on the fly with [`DataConfig::tokenizer`]; every token is a label.
    Text,
    /// `prompt` and `completion` string columns, tokenized on the fly; the prompt part is masked (-100).
    PromptCompletion,
}

/// How documents become fixed-length rows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// One document per row, right-padded with `pad_token_id` (labels -100, segment 0).
    #[default]
    Pad,
    /// Documents are concatenated and cut into rows of exactly `seq_len` tokens, no padding.
    /// A document that does not fit in the rest of a row continues at the start of the next one
    /// (as a new segment with positions restarting at 0). Positions restart at 0 and the segment id
    /// increases at every document start; the label of a document's first token is -100 whenever it is
    /// not at row position 0, so the model's shift never predicts across a document boundary.
    Pack,
}

/// What to do with a document longer than `seq_len`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first `seq_len` tokens, drop the rest.
    #[default]
    Truncate,
    /// Keep every token: pad mode makes one row per `seq_len` piece; pack mode lets it span rows.
    Split,
    /// Fail with an error naming file, column and row.
    Error,
}

/// What to do with a bad row (null, out-of-range token id, length mismatch, over-long under
/// `truncation = "error"`, unparsable JSON line).
///
/// File-level problems (missing file or column, wrong column type, corrupt file) always fail.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop with the error.
    #[default]
    Fail,
    /// Drop the row and continue.
    Skip,
}

/// Whether the train split is shuffled. The eval split is never shuffled.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Shuffle {
    /// Chunk (row group / record batch) order is permuted per epoch from `seed + epoch`,
    /// and rows go through a shuffle buffer of `shuffle_buffer` rows.
    #[default]
    Seeded,
    /// Files and rows are read in order.
    Off,
}

/// A special token given either by id or by its string in the tokenizer's vocabulary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum TokenRef {
    /// A token id.
    Id(u32),
    /// A token string, looked up in the tokenizer (so it needs [`DataConfig::tokenizer`]).
    Token(String),
}

/// Column names. Optional columns (`labels`, `attention_mask`) are used when the file has them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    /// Token ids, `list<int32|int64|uint32>` or `large_list` of those. Default `"input_ids"`.
    #[serde(default = "default_input_ids")]
    pub input_ids: String,
    /// Optional labels, same length as `input_ids`, -100 = ignored. Default `"labels"`.
    #[serde(default = "default_labels")]
    pub labels: String,
    /// Optional mask; tokens whose mask is 0 are dropped from the document. Default `"attention_mask"`.
    #[serde(default = "default_attention_mask")]
    pub attention_mask: String,
    /// Text for `content = "text"`. Default `"text"`.
    #[serde(default = "default_text")]
    pub text: String,
    /// Prompt for `content = "prompt_completion"`. Default `"prompt"`.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// Completion for `content = "prompt_completion"`. Default `"completion"`.
    #[serde(default = "default_completion")]
    pub completion: String,
}

fn default_input_ids() -> String {
    "input_ids".into()
}
fn default_labels() -> String {
    "labels".into()
}
fn default_attention_mask() -> String {
    "attention_mask".into()
}
fn default_text() -> String {
    "text".into()
}
fn default_prompt() -> String {
    "prompt".into()
}
fn default_completion() -> String {
    "completion".into()
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            input_ids: default_input_ids(),
            labels: default_labels(),
            attention_mask: default_attention_mask(),
            text: default_text(),
            prompt: default_prompt(),
            completion: default_completion(),
        }
    }
}

/// `[data]` section of the job TOML.
///
/// ```
/// let cfg: bellows_data::DataConfig = serde_json::from_str(r#"{"train": "data/*.parquet", "seq_len": 64}"#).unwrap();
/// let mut issues = Vec::new();
/// cfg.validate("data", &mut issues);
/// assert!(issues.is_empty());
/// assert_eq!(cfg.batch_size, 8);
/// ```
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training files: Parquet, Arrow IPC (file or stream), JSONL, or `save_to_disk` folders. Required.
    /// The format is chosen by content (Parquet/Arrow magic bytes, folder) else treated as JSONL.
    pub train: Files,
    /// Held-out files, read once in order by the eval split. Default none.
    #[serde(default)]
    pub eval: Option<Files>,
    /// What rows hold. Default `"tokens"`.
    #[serde(default)]
    pub content: Content,
    /// Column names. Defaults as in [`Columns`].
    #[serde(default)]
    pub columns: Columns,
    /// `tokenizer.json` for text content (and for `eos_token` given as a string). Default none.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens per row fed to the model. Default 256, must be >= 2.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Rows per micro-batch per rank. Default 8, must be >= 1.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// `"pad"` (default) or `"pack"`, see [`Packing`].
    #[serde(default)]
    pub packing: Packing,
    /// Over-long documents: `"truncate"` (default), `"split"` or `"error"`, see [`Truncation`].
    #[serde(default)]
    pub truncation: Truncation,
    /// Bad rows: `"fail"` (default) or `"skip"`, see [`OnError`].
    #[serde(default)]
    pub on_error: OnError,
    /// `"seeded"` (default) or `"off"`, see [`Shuffle`].
    #[serde(default)]
    pub shuffle: Shuffle,
    /// Rows held in the shuffle buffer; 0 turns row shuffling off (chunk order is still shuffled).
    /// Default 1024. Memory: one decoded document per slot.
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Token id written at padded positions (their label is -100 and segment 0). Default 0.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Append `eos_token` to every document that does not already end with it. Default false.
    #[serde(default)]
    pub add_eos: bool,
    /// The end-of-sequence token, needed by `add_eos`. Default none.
    #[serde(default)]
    pub eos_token: Option<TokenRef>,
}

fn default_seq_len() -> usize {
    256
}
fn default_batch_size() -> usize {
    8
}
fn default_shuffle_buffer() -> usize {
    1024
}

impl DataConfig {
    /// A config with every default and the given train files.
    pub fn new(train: Files) -> Self {
        DataConfig {
            train,
            eval: None,
            content: Content::default(),
            columns: Columns::default(),
            tokenizer: None,
            seq_len: default_seq_len(),
            batch_size: default_batch_size(),
            packing: Packing::default(),
            truncation: Truncation::default(),
            on_error: OnError::default(),
            shuffle: Shuffle::default(),
            shuffle_buffer: default_shuffle_buffer(),
            pad_token_id: 0,
            add_eos: false,
            eos_token: None,
        }
    }

    /// Push every problem as (dotted key, message), e.g. `("data.seq_len", "must be >= 2, got 1")`.
    /// `at` is the section prefix (`"data"`). Checks only the config itself, not the files.
    pub fn validate(&self, at: &str, out: &mut Vec<(String, String)>) {
        let mut push = |key: &str, msg: String| out.push((format!("{at}.{key}"), msg));
        check_files(&self.train, "train", &mut push);
        if let Some(eval) = &self.eval {
            check_files(eval, "eval", &mut push);
        }
        if self.seq_len < 2 {
            push("seq_len", format!("must be >= 2, got {}", self.seq_len));
        }
        if self.batch_size == 0 {
            push("batch_size", "must be >= 1, got 0".into());
        }
        let needs_tokenizer = match self.content {
            Content::Tokens => None,
            Content::Text => Some("text"),
            Content::PromptCompletion => Some("prompt_completion"),
        };
        if let (Some(c), None) = (needs_tokenizer, &self.tokenizer) {
            push("tokenizer", format!("required when content = {c:?}"));
        }
        if self.add_eos && self.eos_token.is_none() {
            push("eos_token", "required when add_eos = true".into());
        }
        if let (Some(TokenRef::Token(t)), None) = (&self.eos_token, &self.tokenizer) {
            push(
                "eos_token",
                format!("{t:?} is a token string, which needs data.tokenizer (or give an id)"),
            );
        }
        let c = &self.columns;
        for (key, name) in [
            ("columns.input_ids", &c.input_ids),
            ("columns.labels", &c.labels),
            ("columns.attention_mask", &c.attention_mask),
            ("columns.text", &c.text),
            ("columns.prompt", &c.prompt),
            ("columns.completion", &c.completion),
        ] {
            if name.is_empty() {
                push(key, "must not be empty".into());
            }
        }
    }

    pub(crate) fn validated(&self) -> crate::Result<()> {
        let mut issues = Vec::new();
        self.validate("data", &mut issues);
        if issues.is_empty() {
            Ok(())
        } else {
            Err(crate::Error::Config(issues))
        }
    }
}

fn check_files(files: &Files, key: &str, push: &mut impl FnMut(&str, String)) {
    let p = files.patterns();
    if p.is_empty() {
        push(key, "must name at least one file".into());
    }
    if p.iter().any(|s| s.trim().is_empty()) {
        push(key, "contains an empty path".into());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn validate_reports_every_problem_with_its_key() {
        let mut cfg = DataConfig::new(Files::Many(vec![]));
        cfg.seq_len = 1;
        cfg.batch_size = 0;
        cfg.content = Content::Text;
        cfg.add_eos = true;
        let mut out = Vec::new();
        cfg.validate("data", &mut out);
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "data.train",
                "data.seq_len",
                "data.batch_size",
                "data.tokenizer",
                "data.eos_token"
            ]
        );
        assert_eq!(out[1].1, "must be >= 2, got 1");
    }

    #[test]
    fn files_accepts_string_or_list_and_rejects_unknown_keys() {
        let one: DataConfig = serde_json::from_str(r#"{"train":"a.parquet"}"#).unwrap();
        assert_eq!(one.train.patterns(), ["a.parquet"]);
        let many: DataConfig =
            serde_json::from_str(r#"{"train":["a","b"],"packing":"pack","eos_token":2}"#).unwrap();
        assert_eq!(many.train.patterns(), ["a", "b"]);
        assert_eq!(many.packing, Packing::Pack);
        assert_eq!(many.eos_token, Some(TokenRef::Id(2)));
        let bad = serde_json::from_str::<DataConfig>(r#"{"train":"a","seq_lenn":3}"#);
        assert!(bad.unwrap_err().to_string().contains("seq_lenn"));
    }
}
