//! On-the-fly tokenization of text and prompt/completion rows with a `tokenizer.json`.

use std::path::{Path, PathBuf};

use tokenizers::{Encoding, Tokenizer};

use crate::{Error, Result};

/// A loaded `tokenizer.json`, with its own padding and truncation switched off
/// (the loader does both itself).
pub(crate) struct TextEncoder {
    tok: Tokenizer,
    path: PathBuf,
}

impl TextEncoder {
    /// Loads the tokenizer.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] when the file is missing or not a tokenizer.
    pub fn load(path: &Path) -> Result<Self> {
        let mut tok = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(TextEncoder {
            tok,
            path: path.to_path_buf(),
        })
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// The tokenizer file (for error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` with the special tokens the post-processor adds (BOS/EOS).
    pub fn encode_text(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        let enc = self.tok.encode(text, true).map_err(|e| e.to_string())?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of prompt followed by completion, and their labels: -100 over the prompt and any
    /// special tokens before the completion, the token ids elsewhere (so a trailing EOS is learned).
    ///
    /// Both parts are encoded without special tokens, concatenated, and then passed once through the
    /// tokenizer's post-processor as a single sequence, so BOS/EOS appear exactly as for plain text.
    pub fn encode_prompt_completion(
        &self,
        prompt: &str,
        completion: &str,
    ) -> std::result::Result<(Vec<u32>, Vec<i64>), String> {
        let p = self.tok.encode(prompt, false).map_err(|e| e.to_string())?;
        let c = self
            .tok
            .encode(completion, false)
            .map_err(|e| e.to_string())?;
        let prompt_tokens = p.len();
        let merged = Encoding::merge([p, c], true);
        let enc = self
            .tok
            .post_process(merged, None, true)
            .map_err(|e| e.to_string())?;
        let ids = enc.get_ids().to_vec();
        let special: Vec<bool> = (0..ids.len())
            .map(|i| enc.get_special_tokens_mask().get(i).copied() == Some(1))
            .collect();
        // Index of the first completion token (the first ordinary token past the prompt's count).
        let mut rank = 0usize;
        let mut first_completion = ids.len();
        for (i, &s) in special.iter().enumerate() {
            if !s {
                if rank == prompt_tokens {
                    first_completion = i;
                    break;
                }
                rank += 1;
            }
        }
        let mut labels = Vec::with_capacity(ids.len());
        let mut seen = 0usize;
        for (i, &id) in ids.iter().enumerate() {
            let masked = if special[i] {
                // Special tokens before the completion are prompt (BOS); a trailing one is learned (EOS).
                i < first_completion && (first_completion < ids.len() || seen < prompt_tokens)
            } else {
                seen += 1;
                seen <= prompt_tokens
            };
            labels.push(if masked { -100 } else { i64::from(id) });
        }
        Ok((ids, labels))
    }
}
