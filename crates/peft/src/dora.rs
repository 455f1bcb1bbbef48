//! DoRA's weight norm (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

use burn::tensor::{backend::Backend, Tensor};

use crate::linear::LoraAdapter;

/// `‖W + s·B·A‖₂` per output row, `[out]`, **detached**: as in PEFT and the DoRA paper (§4.3), no
/// gradient flows through the norm, only through the magnitude and the side path.
pub(crate) fn weight_norm<B: Backend>(w: Tensor<B, 2>, lora: &LoraAdapter<B>) -> Tensor<B, 1> {
    let d_out = w.dims()[0];
    let delta = lora
        .lora_b
        .val()
        .detach()
        .matmul(lora.lora_a.val().detach())
        .mul_scalar(lora.scale);
    (w.detach() + delta)
        .powf_scalar(2.0)
        .sum_dim(1)
        .sqrt()
        .reshape([d_out])
        .detach()
}
