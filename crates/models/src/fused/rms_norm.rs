//! RMSNorm (Zhang & Sennrich 2019) as one autodiff node.
//!
//! With `r = 1/√(mean(x²) + ε)` per row, `n = x·r` and `y = w·n` (`w` broadcast over the rows):
//! `dw = Σ_rows dy·n`, and with `dn = dy·w`, `dx = r·(dn − n·mean(dn·n))`.
//! The forward runs the same backend ops in the same order as [`crate::RmsNorm`]'s plain
//! composition, so outputs are bit-identical; only the gradients' rounding differs.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, Tensor, TensorPrimitive};

use super::{inner, on_backend, prim, Ad};

/// `(n, r)` for `x`: the normalised rows and `1/√(mean(x²) + ε)`, `[.., 1]`.
fn normalize<I: Backend, const D: usize>(
    x: Tensor<I, D>,
    eps: f64,
) -> (Tensor<I, D>, Tensor<I, D>) {
    let r = (x.clone().powi_scalar(2).mean_dim(D - 1) + eps)
        .sqrt()
        .recip();
    (x * r.clone(), r)
}

/// `dx = r·(dn − n·mean(dn·n))`, the gradient through `n = x·r`.
fn normalize_grad<I: Backend, const D: usize>(
    dn: Tensor<I, D>,
    n: Tensor<I, D>,
    r: Tensor<I, D>,
) -> Tensor<I, D> {
    let dot = (dn.clone() * n.clone()).mean_dim(D - 1);
    (dn - n * dot) * r
}

/// The backward pass of `y = w·n` with `n = x·r` (f32 `x` and `w`).
#[derive(Debug)]
struct RmsNormBackward<const D: usize>;

impl<I: Backend, const D: usize> Backward<I, 2> for RmsNormBackward<D> {
    /// `x`, `r` and `w`.
    type State = (
        I::FloatTensorPrimitive,
        I::FloatTensorPrimitive,
        I::FloatTensorPrimitive,
    );

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        let (x, r, w) = ops.state;
        let (x, r) = (inner::<I, D>(x), inner::<I, D>(r));
        let w = inner::<I, 1>(w);
        let dy = inner::<I, D>(grad);
        let n = x * r.clone();
        if let Some(pw) = pw {
            let d = w.dims()[0];
            let rows = dy.shape().num_elements() / d;
            let dw = (dy.clone() * n.clone()).reshape([rows, d]).sum_dim(0);
            grads.register::<I>(pw.id, prim(dw.reshape([d])));
        }
        if let Some(px) = px {
            let dn = dy * w.unsqueeze::<D>();
            grads.register::<I>(px.id, prim(normalize_grad(dn, n, r)));
        }
    }
}

/// The backward pass of `n = x·r` alone, for the mixed-precision path.
#[derive(Debug)]
struct NormalizeBackward<const D: usize>;

impl<I: Backend, const D: usize> Backward<I, 1> for NormalizeBackward<D> {
    /// `x` and `r`.
    type State = (I::FloatTensorPrimitive, I::FloatTensorPrimitive);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        if let Some(px) = px {
            let (x, r) = (inner::<I, D>(ops.state.0), inner::<I, D>(ops.state.1));
            let n = x * r.clone();
            grads.register::<I>(px.id, prim(normalize_grad(inner::<I, D>(grad), n, r)));
        }
    }
}

fn rms_norm_autodiff<I: Backend, C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<I, C>, D>,
    w: Tensor<Autodiff<I, C>, 1>,
    eps: f64,
) -> Tensor<Autodiff<I, C>, D> {
    let (TensorPrimitive::Float(xp), TensorPrimitive::Float(wp)) =
        (x.into_primitive(), w.into_primitive())
    else {
        panic!("rms norm takes float tensors");
    };
    let (n, r) = normalize(inner::<I, D>(xp.primitive.clone()), eps);
    let y = prim(n * inner::<I, 1>(wp.primitive.clone()).unsqueeze::<D>());
    let out = match RmsNormBackward::<D>
        .prepare::<C>([xp.node, wp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xp.primitive, prim(r), wp.primitive), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn normalize_autodiff<I: Backend, C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<I, C>, D>,
    eps: f64,
) -> Tensor<Autodiff<I, C>, D> {
    let TensorPrimitive::Float(xp) = x.into_primitive() else {
        panic!("rms norm takes a float tensor");
    };
    let (n, r) = normalize(inner::<I, D>(xp.primitive.clone()), eps);
    let out = match NormalizeBackward::<D>
        .prepare::<C>([xp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xp.primitive, prim(r)), prim(n)),
        OpsKind::UnTracked(prep) => prep.finish(prim(n)),
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

    fn check(x_dtype: DType, w_dtype: DType, atol: f32, rtol: f32) {
        let x = leaf([2, 5, 32], x_dtype, 4);
        let w = leaf([32], w_dtype, 5);
        let (xa, wa, xb, wb) = (twin(&x), twin(&w), twin(&x), twin(&w));
        let ya = rms_norm(xa.clone(), wa.clone(), 1e-5);
        let yb = plain(xb.clone(), wb.clone(), 1e-5);
        assert_close("y", ya.clone(), yb.clone(), 0.0, 0.0);
        let (ga, gb) = (loss(ya).backward(), loss(yb).backward());
        let dxa = xa.grad(&ga).expect("dx");
        assert_close("dx", dxa, xb.grad(&gb).expect("dx"), atol, rtol);
        let dwa = wa.grad(&ga).expect("dw");
        assert_close("dw", dwa, wb.grad(&gb).expect("dw"), atol, rtol);
    }

    #[test]
    fn fused_rms_norm_matches_the_plain_composition_in_f32() {
        check(DType::F32, DType::F32, 1e-5, 1e-4);
    }

    #[test]
    fn fused_rms_norm_matches_the_plain_composition_for_bf16_inputs() {
        check(DType::BF16, DType::F32, 3e-2, 3e-2);
        check(DType::BF16, DType::BF16, 3e-2, 3e-2);
    }
}
