//! The SwiGLU feed-forward block (Shazeer 2020): `down(silu(gate(x)) · up(x))`.

use bellows_peft::{InitRng, Linear, LoraPlan};
use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::attention::linear;
use crate::config::ModelArch;
use crate::source::{BaseSource, RandomInit};

/// `gate_proj`, `up_proj`, `down_proj` (Hugging Face names).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection `[inter, hidden]`.
    pub gate_proj: Linear<B>,
    /// Up projection `[inter, hidden]`.
    pub up_proj: Linear<B>,
    /// Down projection `[hidden, inter]`.
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// A randomly initialised block for layer `layer`; adapters where `plan` says.
    pub fn new(
        arch: &ModelArch,
        plan: &LoraPlan,
        layer: usize,
        rng: &mut InitRng,
        device: &B::Device,
    ) -> Self {
        let mut src = RandomInit {
            std: arch.initializer_range,
            quantize: None,
            device,
        };
        Self::build(arch, plan, layer, &mut src, rng).expect("the random init cannot fail")
    }

    /// The block for layer `layer` with base weights from `src`; adapters where `plan` says.
    ///
    /// # Errors
    /// `src` cannot provide a weight.
    pub fn build(
        arch: &ModelArch,
        plan: &LoraPlan,
        layer: usize,
        src: &mut dyn BaseSource<B>,
        rng: &mut InitRng,
    ) -> crate::Result<Self> {
        let (d, i) = (arch.hidden_size, arch.intermediate_size);
        let p = |n: &str| format!("model.layers.{layer}.mlp.{n}");
        Ok(Mlp {
            gate_proj: linear(src, plan, p("gate_proj"), (d, i, false), rng)?,
            up_proj: linear(src, plan, p("up_proj"), (d, i, false), rng)?,
            down_proj: linear(src, plan, p("down_proj"), (i, d, false), rng)?,
        })
    }

    /// Applies the block to `x: [batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let g = self.gate_proj.forward(x.clone());
        let h = crate::fused::swiglu::swiglu(g, self.up_proj.forward(x));
        self.down_proj.forward(h)
    }
}
