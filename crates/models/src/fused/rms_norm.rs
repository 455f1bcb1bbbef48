//! RMSNorm (Zhang & Sennrich 2019) as one autodiff node.
//!
//! With `r = 1/√(mean(x²) + ε)` per row, `n = x·r` and `y = w·n` (`w` broadcast over the rows):
//! `dw = Σ_rows dy·n`, and with `dn = dy·w`, `dx = r·(dn − n·mean(dn·n))`. One parallel pass
//! forward and one backward ([`super::rms_norm_kernel`]), where the plain composition runs five
//! backend ops forward and nine backward; the row means are lane sums, so the output equals the
//! composition's to rounding (not to the bit).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use super::rms_norm_kernel::{backward, forward, Saved};
use super::{f32_slice, flex_tensor, on_backend, primitive, Ad};

/// What the backward pass keeps: the contiguous f32 input, its per-row `r`, the gain (absent
/// for the normalisation alone) and the input's shape.
#[derive(Debug)]
struct State {
    x: FlexTensor,
    r: Vec<f32>,
    w: Option<FlexTensor>,
    shape: Shape,
}

impl State {
    /// `(dx, dw)` for the upstream gradient `dy`, each only when wanted.
    fn grads(
        &self,
        dy: &FlexTensor,
        want_dx: bool,
        want_dw: bool,
    ) -> (Option<FlexTensor>, Option<FlexTensor>) {
        let d = self.shape[self.shape.num_dims() - 1];
        let saved = Saved {
            x: f32_slice(&self.x),
            r: &self.r,
            w: self.w.as_ref().map(f32_slice),
            dy: f32_slice(dy),
            d,
        };
        let (dx, dw) = backward(saved, want_dx, want_dw);
        (
            dx.map(|v| flex_tensor(v, self.shape.clone())),
            dw.map(|v| flex_tensor(v, [d])),
        )
    }
}

/// The backward pass of `y = w·(x·r)`.
#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (dx, dw) = ops.state.grads(&dy, px.is_some(), pw.is_some());
        if let (Some(px), Some(dx)) = (px, dx) {
            grads.register::<Flex>(px.id, dx);
        }
        if let (Some(pw), Some(dw)) = (pw, dw) {
            grads.register::<Flex>(pw.id, dw);
        }
    }
}

/// The backward pass of `n = x·r` alone, for the mixed-precision path.
#[derive(Debug)]
struct NormalizeBackward;

impl Backward<Flex, 1> for NormalizeBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(px) = px {
            if let (Some(dx), _) = ops.state.grads(&dy, true, false) {
                grads.register::<Flex>(px.id, dx);
            }
        }
    }
}

/// `w·(x·r)` (`x·r` without `w`) of contiguous f32 tensors, and the state for its backward pass.
fn compute(x: FlexTensor, w: Option<FlexTensor>, shape: Shape, eps: f64) -> (FlexTensor, State) {
    let d = shape[shape.num_dims() - 1];
    let (y, r) = forward(f32_slice(&x), w.as_ref().map(f32_slice), d, eps as f32);
    let y = flex_tensor(y, shape.clone());
    (y, State { x, r, w, shape })
}

fn rms_norm_autodiff<const D: usize>(
    x: Tensor<Ad, D>,
    w: Tensor<Ad, 1>,
    eps: f64,
) -> Tensor<Ad, D> {
    let shape = x.shape();
    let (xp, wp) = (primitive(x), primitive(w));
    let (xi, wi) = (xp.primitive.to_contiguous(), wp.primitive.to_contiguous());
    let (y, state) = compute(xi, Some(wi), shape, eps);
    let out = match RmsNormBackward
        .prepare::<NoCheckpointing>([xp.node, wp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(Arc::new(state), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn normalize_autodiff<const D: usize>(x: Tensor<Ad, D>, eps: f64) -> Tensor<Ad, D> {
    let shape = x.shape();
    let xp = primitive(x);
    let (y, state) = compute(xp.primitive.to_contiguous(), None, shape, eps);
    let out = match NormalizeBackward
        .prepare::<NoCheckpointing>([xp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(Arc::new(state), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `x / √(mean(x²) + ε)` over the last dimension, for an f32 `x`.
fn normalize_f32<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    match on_backend(x, |x: Tensor<Ad, D>| normalize_autodiff(x, eps)) {
        Ok(n) => n,
        Err(x) => x.clone() * (x.powi_scalar(2).mean_dim(D - 1) + eps).sqrt().recip(),
    }
}

/// `weight · x / √(mean(x²) + ε)` over the last dimension of `x`, the normalisation in f32 and
/// the result in `x`'s dtype (`weight: [d]` is cast to it), exactly as [`crate::RmsNorm`]
/// documents.
///
/// On `Autodiff<Flex>` the f32 case is one fused node and a low-precision `x` fuses the
/// normalisation (the casts and the gain stay burn ops); elsewhere the plain composition.
pub(crate) fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    if dtype == DType::F32 && weight.dtype() == DType::F32 {
        let fused = on_backend((x, weight), |(x, w): (Tensor<Ad, D>, Tensor<Ad, 1>)| {
            rms_norm_autodiff(x, w, eps)
        });
        return match fused {
            Ok(y) => y,
            Err((x, w)) => normalize_f32(x, eps) * w.unsqueeze(),
        };
    }
    let xf = if dtype == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    };
    let normed = normalize_f32(xf, eps);
    let normed = if dtype == DType::F32 {
        normed
    } else {
        normed.cast(dtype)
    };
    let w = if weight.dtype() == dtype {
        weight
    } else {
        weight.cast(dtype)
    };
    normed * w.unsqueeze()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Tensor};

    use super::super::testing::{assert_close, leaf, loss, twin};
    use super::super::Ad;
    use super::rms_norm;

    /// The composition `RmsNorm::forward` used before the fused op.
    fn plain(x: Tensor<Ad, 3>, w: Tensor<Ad, 1>, eps: f64) -> Tensor<Ad, 3> {
        let dtype = x.dtype();
        let xf = x.cast(DType::F32);
        let var = xf.clone().powi_scalar(2).mean_dim(2);
        let normed = (xf * (var + eps).sqrt().recip()).cast(dtype);
        normed * w.cast(dtype).unsqueeze()
    }

    fn check(x_dtype: DType, w_dtype: DType, y_rtol: f32, atol: f32, rtol: f32) {
        let x = leaf([2, 5, 32], x_dtype, 4);
        let w = leaf([32], w_dtype, 5);
        let (xa, wa, xb, wb) = (twin(&x), twin(&w), twin(&x), twin(&w));
        let ya = rms_norm(xa.clone(), wa.clone(), 1e-5);
        let yb = plain(xb.clone(), wb.clone(), 1e-5);
        assert_close("y", ya.clone(), yb.clone(), 1e-7, y_rtol);
        let (ga, gb) = (loss(ya).backward(), loss(yb).backward());
        let dxa = xa.grad(&ga).expect("dx");
        assert_close("dx", dxa, xb.grad(&gb).expect("dx"), atol, rtol);
        let dwa = wa.grad(&ga).expect("dw");
        assert_close("dw", dwa, wb.grad(&gb).expect("dw"), atol, rtol);
    }

    #[test]
    fn fused_rms_norm_matches_the_plain_composition_in_f32() {
        // The row means are lane sums: y to f32 rounding of the composition's.
        check(DType::F32, DType::F32, 1e-6, 1e-5, 1e-4);
    }

    #[test]
    fn fused_rms_norm_matches_the_plain_composition_for_bf16_inputs() {
        // One bf16 step (2⁻⁸) where an f32 last-bit difference crosses a rounding boundary.
        check(DType::BF16, DType::F32, 8e-3, 3e-2, 3e-2);
        check(DType::BF16, DType::BF16, 8e-3, 3e-2, 3e-2);
    }
}
