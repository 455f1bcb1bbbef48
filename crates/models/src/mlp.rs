//! The SwiGLU feed-forward block (Shazeer 2020): `down(silu(gate(x)) · up(x))`.

use bellows_peft::{InitRng, Linear, LoraPlan};
use burn::module::Module;
use burn::tensor::{activation::silu, backend::Backend, Tensor};

use crate::attention::linear;
use crate::config::ModelArch;

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
        let (d, i) = (arch.hidden_size, arch.intermediate_size);
        let p = |n: &str| format!("model.layers.{layer}.mlp.{n}");
        Mlp {
            gate_proj: linear(arch, plan, p("gate_proj"), (d, i, false), rng, device),
            up_proj: linear(arch, plan, p("up_proj"), (d, i, false), rng, device),
            down_proj: linear(arch, plan, p("down_proj"), (i, d, false), rng, device),
        }
    }

    /// Applies the block to `x: [batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let g = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(g * self.up_proj.forward(x))
    }
}
