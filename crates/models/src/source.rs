//! Where a new model's base parameters come from: a seeded random init, or (in [`crate::hf`])
//! checkpoint files read tensor by tensor, so no parameter is created twice.

use bellows_peft::{InitRng, Linear, Nf4Options, ShardGroup};
use burn::tensor::{backend::Backend, Tensor};

use crate::Result;

/// The shape of a linear layer: input width, output width, whether it has a bias.
pub type LinearShape = (usize, usize, bool);

/// A provider of base parameters, asked once per parameter while a model is built.
///
/// Adapters are not its business: the builder attaches them (from the `rng` it passes along)
/// after the base of each linear layer exists.
pub trait BaseSource<B: Backend> {
    /// The base of the linear layer at `path` (an HF module path such as
    /// `model.layers.0.self_attn.q_proj`), weight `[d_out, d_in]`. `quantizable` says whether this
    /// layer may be NF4-quantized (not `lm_head`, not a `modules_to_save` module).
    ///
    /// # Errors
    /// A missing, mis-shaped or unreadable tensor.
    fn linear(
        &mut self,
        path: &str,
        shape: LinearShape,
        quantizable: bool,
        rng: &mut InitRng,
    ) -> Result<Linear<B>>;

    /// The embedding table `[vocab, hidden]` at `path` (`model.embed_tokens.weight`).
    ///
    /// # Errors
    /// As [`BaseSource::linear`].
    fn embedding(
        &mut self,
        path: &str,
        shape: [usize; 2],
        rng: &mut InitRng,
    ) -> Result<Tensor<B, 2>>;

    /// The gain `[d]` of the norm whose weight is at `path`.
    ///
    /// # Errors
    /// As [`BaseSource::linear`].
    fn norm(&mut self, path: &str, d: usize) -> Result<Tensor<B, 1>>;

    /// FSDP: the group whose ranks each hold rows of the tensors this source gives (see
    /// [`crate::ShardingSource`]); `None` (the default) for whole tensors.
    fn shard_group(&self) -> Option<&ShardGroup> {
        None
    }
}

/// Hugging Face's random init: linears and embeddings N(0, std²), zero biases, unit norms, all
/// drawn from the caller's [`InitRng`] in module order; quantizable linears are NF4-quantized
/// one at a time when `quantize` is set.
#[derive(Debug, Clone)]
pub struct RandomInit<'a, B: Backend> {
    /// The standard deviation (`initializer_range`).
    pub std: f64,
    /// Quantize the quantizable linears.
    pub quantize: Option<Nf4Options>,
    /// Where the tensors live.
    pub device: &'a B::Device,
}

impl<B: Backend> BaseSource<B> for RandomInit<'_, B> {
    fn linear(
        &mut self,
        _path: &str,
        (d_in, d_out, bias): LinearShape,
        quantizable: bool,
        rng: &mut InitRng,
    ) -> Result<Linear<B>> {
        let l = Linear::new(d_in, d_out, bias, self.std, rng, self.device);
        Ok(match self.quantize {
            Some(opts) if quantizable => l.quantize(opts),
            _ => l,
        })
    }

    fn embedding(
        &mut self,
        _path: &str,
        shape: [usize; 2],
        rng: &mut InitRng,
    ) -> Result<Tensor<B, 2>> {
        Ok(rng.normal(shape, 0.0, self.std, self.device))
    }

    fn norm(&mut self, _path: &str, d: usize) -> Result<Tensor<B, 1>> {
        Ok(Tensor::ones([d], self.device))
    }
}
