//! `bellows generate`: continues a prompt with a KV cache (greedy at temperature 0).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::adapter_args::AdapterArgs;
use crate::quantize_arg::QuantizeArg;
use bellows_models::{generate, GenerateOptions};

/// Options of `bellows generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A Hugging Face model folder (with `tokenizer.json` for text prompts).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// The prompt text (needs `tokenizer.json` in the model folder).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids (no tokenizer needed); output is ids too.
    #[arg(long)]
    prompt_ids: Option<String>,
    /// New tokens at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Quantize the model's decoder linears to 4 bits while loading (a bitsandbytes 4-bit
    /// checkpoint loads quantized without it).
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
}

fn fail(msg: String) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

/// Generates and prints the continuation (text, or ids for `--prompt-ids`).
pub fn run(a: GenerateArgs) -> ExitCode {
    let device = Default::default();
    let loaded = a
        .adapters
        .load(&a.model, a.quantize.map(QuantizeArg::options));
    let (arch, model) = match loaded {
        Ok(m) => m,
        Err(e) => return fail(e.to_string()),
    };
    let tok_path = a.model.join("tokenizer.json");
    let (prompt, tokenizer) = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => {
            let tok = match tokenizers::Tokenizer::from_file(&tok_path) {
                Ok(t) => t,
                Err(e) => {
                    return fail(format!(
                        "{}: {e} (use --prompt-ids without a tokenizer)",
                        tok_path.display()
                    ))
                }
            };
            match tok.encode(text.as_str(), true) {
                Ok(enc) => (enc.get_ids().to_vec(), Some(tok)),
                Err(e) => {
                    return fail(format!(
                        "{}: cannot encode the prompt: {e}",
                        tok_path.display()
                    ))
                }
            }
        }
        (None, Some(ids)) => {
            let parsed: Result<Vec<u32>, _> =
                ids.split(',').map(|s| s.trim().parse::<u32>()).collect();
            match parsed {
                Ok(v) if !v.is_empty() => (v, None),
                _ => {
                    return fail(format!(
                        "--prompt-ids: expected comma-separated token ids, got {ids:?}"
                    ))
                }
            }
        }
        (None, None) => return fail("give --prompt or --prompt-ids".into()),
    };
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= arch.vocab_size) {
        return fail(format!(
            "prompt token {bad} is outside the vocabulary of {}",
            arch.vocab_size
        ));
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        eos_token_id: arch.eos_token_id,
    };
    let new = generate(&model, &prompt, &opts, &device);
    match tokenizer {
        Some(tok) => match tok.decode(&new, true) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail(format!("cannot decode: {e}")),
        },
        None => println!(
            "{}",
            new.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        ),
    }
    ExitCode::SUCCESS
}
