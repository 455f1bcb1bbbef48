//! `--adapter DIR` (repeatable) and `--adapter-weights`, shared by `eval` and `generate`.

use std::path::{Path, PathBuf};

use bellows_models::{
    load_pretrained, load_pretrained_with_adapter, load_pretrained_with_weighted_adapters,
    CausalLm, ModelArch,
};
use bellows_peft::{Combination, LoraPlan};
use burn::backend::Flex;
use clap::Args;

/// Adapters applied on top of the model.
#[derive(Debug, Args)]
pub struct AdapterArgs {
    /// A PEFT adapter folder applied on top of the model. Repeat it with `--adapter-weights` to
    /// apply PEFT's linear weighted combination of several adapters.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// One weight per `--adapter`, comma-separated: the adapters are combined as PEFT's
    /// `add_weighted_adapter(..., combination_type="linear")` (equal ranks; LoRA / rsLoRA).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    adapter_weights: Vec<f64>,
}

impl AdapterArgs {
    /// The single adapter folder, when exactly one is given without weights.
    pub fn single(&self) -> Option<&Path> {
        match (self.adapter.as_slice(), self.adapter_weights.is_empty()) {
            ([one], true) => Some(one),
            _ => None,
        }
    }

    /// Whether several adapters (or weights) are given, so they are combined.
    pub fn combines(&self) -> bool {
        self.adapter.len() > 1 || !self.adapter_weights.is_empty()
    }

    /// Loads `model` with the adapters: none, one as is, or several combined with their weights.
    ///
    /// # Errors
    /// Weights without adapters or of another count, several adapters without weights, or any
    /// loading problem.
    pub fn load(&self, model: &Path) -> anyhow::Result<(ModelArch, CausalLm<Flex>)> {
        let device = Default::default();
        let (n, w) = (self.adapter.len(), self.adapter_weights.len());
        if n == 0 && w == 0 {
            return Ok(load_pretrained::<Flex>(model, &LoraPlan::none(), &device)?);
        }
        if let Some(one) = self.single() {
            let (arch, _, m) = load_pretrained_with_adapter::<Flex>(model, one, &device)?;
            return Ok((arch, m));
        }
        anyhow::ensure!(
            n == w,
            "{n} --adapter folders but {w} --adapter-weights (give one weight per adapter)"
        );
        Ok(load_pretrained_with_weighted_adapters::<Flex>(
            model,
            &self.adapter,
            &self.adapter_weights,
            Combination::Linear,
            &device,
        )?)
    }
}
