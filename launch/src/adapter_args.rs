//! `--adapter DIR` (repeatable) and `--adapter-weights`, shared by `eval` and `generate`.

use std::path::{Path, PathBuf};

use bellows_models::{
    load_pretrained_quantized, load_pretrained_with_adapter_quantized,
    load_pretrained_with_weighted_adapters_quantized, CausalLm, ModelArch,
};
use bellows_peft::{Combination, InitRng, LoraPlan, Nf4Options};
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

    /// Loads `model` with the adapters: none, one as is, or several combined with their weights;
    /// the base's decoder linears NF4-quantized as they are read when `quantize` is set.
    ///
    /// # Errors
    /// Weights without adapters or of another count, several adapters without weights, or any
    /// loading problem.
    pub fn load(
        &self,
        model: &Path,
        quantize: Option<Nf4Options>,
    ) -> anyhow::Result<(ModelArch, CausalLm<Flex>)> {
        let device = Default::default();
        let (n, w) = (self.adapter.len(), self.adapter_weights.len());
        if n == 0 && w == 0 {
            let none = LoraPlan::none();
            let rng = &mut InitRng::new(0);
            return Ok(load_pretrained_quantized::<Flex>(
                model, &none, quantize, rng, &device,
            )?);
        }
        if let Some(one) = self.single() {
            let (arch, _, m) =
                load_pretrained_with_adapter_quantized::<Flex>(model, one, quantize, &device)?;
            return Ok((arch, m));
        }
        anyhow::ensure!(
            n == w,
            "{n} --adapter folders but {w} --adapter-weights (give one weight per adapter)"
        );
        Ok(load_pretrained_with_weighted_adapters_quantized::<Flex>(
            model,
            &self.adapter,
            &self.adapter_weights,
            Combination::Linear,
            quantize,
            &device,
        )?)
    }
}
