//! `y = x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ)` — a dense linear layer with an optional LoRA side path — as one
//! op: `gemm` straight on the row-major buffers (W, A, B used transposed in place), the side
//! path added in one parallel pass, and a hand-written backward pass
//! (`dX = dY·W + (s·dY·B)·A`, `dW = dYᵀ·X`, `dB = (s·dY)ᵀ·(X·Aᵀ)`, `dA = (s·dY·B)ᵀ·X`) that
//! computes only the gradients some parent needs. It replaces burn's matmul, transpose, scale and
//! add nodes, whose outputs Flex allocates twice (zeroed, then copied to an aligned buffer).
//! The arithmetic of each step is the composition's (products, then `t·s`, then `y + t`), so the
//! two agree to rounding in the products' summation order.
//!

use std::any::TypeId;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::gemm::product;
use super::{f32_slice as slice, flex_tensor as flex, on_backend, primitive, Ad};

/// Elements per task of the element-wise passes.
const CHUNK: usize = 1 << 14;

/// Sizes: `n` rows of `x`, `W: [d_out, d_in]`, adapter rank `r` (0 without one).
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
}

/// `x·Mᵀ` for row-major `x: [rows, k]` and `M: [cols, k]` (read transposed in place).
fn mul_t(x: &[f32], m: &[f32], rows: usize, k: usize, cols: usize) -> Vec<f32> {
    product(x, (k, 1), m, (1, k), (rows, k, cols))
}

/// `x·M` for row-major `x: [rows, k]` and `M: [k, cols]`.
fn mul(x: &[f32], m: &[f32], rows: usize, k: usize, cols: usize) -> Vec<f32> {
    product(x, (k, 1), m, (cols, 1), (rows, k, cols))
}

/// `aᵀ·b` for row-major `a: [k, rows]` (read transposed in place) and `b: [k, cols]`.
fn t_mul(a: &[f32], b: &[f32], k: usize, rows: usize, cols: usize) -> Vec<f32> {
    product(a, (1, rows), b, (cols, 1), (rows, k, cols))
}

/// `y ← y + t·s` element-wise, in parallel (the composition's `y + t.mul_scalar(s)`).
fn add_scaled(y: &mut [f32], t: &[f32], s: f32) {
    y.par_chunks_mut(CHUNK)
        .zip(t.par_chunks(CHUNK))
        .for_each(|(y, t)| y.iter_mut().zip(t).for_each(|(y, &t)| *y += t * s));
}

/// The forward pass: `y` and, with an adapter, `x·Aᵀ` (kept for the backward pass).
fn forward(
    d: Dims,
    x: &[f32],
    w: &[f32],
    lora: Option<(&[f32], &[f32], f32)>,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = mul_t(x, w, d.n, d.d_in, d.d_out);
    let xa = match lora {
        Some((a, b, s)) => {
            let xa = mul_t(x, a, d.n, d.d_in, d.r);
            let t = mul_t(&xa, b, d.n, d.r, d.d_out);
            add_scaled(&mut y, &t, s);
            xa
        }
        None => Vec::new(),
    };
    (y, xa)
}

/// What the backward pass reads.
#[derive(Debug)]
struct State {
    d: Dims,
    x: FlexTensor,
    w: FlexTensor,
    /// A, B, the scale and `x·Aᵀ`, with an adapter.
    lora: Option<(FlexTensor, FlexTensor, f32, Vec<f32>)>,
}

/// Gradients `[dX, dW, dA, dB]` for the parents that need them.
fn backward(st: &State, dy: &[f32], need: [bool; 4]) -> [Option<Vec<f32>>; 4] {
    let Dims { n, d_in, d_out, r } = st.d;
    let (x, w) = (slice(&st.x), slice(&st.w));
    let mut dx = need[0].then(|| mul(dy, w, n, d_out, d_in));
    let dw = need[1].then(|| t_mul(dy, x, n, d_out, d_in));
    let (mut da, mut db) = (None, None);
    if let Some((a, b, s, xa)) = &st.lora {
        let (a, b) = (slice(a), slice(b));
        // The composition's backward of `t.mul_scalar(s)`: the side path's gradient is `dY·s`.
        let mut gs = dy.to_vec();
        gs.par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= s));
        if need[0] || need[2] {
            let dxa = mul(&gs, b, n, d_out, r);
            if let Some(dx) = dx.as_mut() {
                let side = mul(&dxa, a, n, r, d_in);
                add_scaled(dx, &side, 1.0);
            }
            if need[2] {
                da = Some(t_mul(&dxa, x, n, r, d_in));
            }
        }
        if need[3] {
            db = Some(t_mul(&gs, xa, n, d_out, r));
        }
    }
    [dx, dw, da, db]
}

#[derive(Debug)]
struct LinearBackward;

impl<const N: usize> Backward<Flex, N> for LinearBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let mut need = [false; 4];
        for (i, p) in ops.parents.iter().enumerate() {
            need[i] = p.is_some();
        }
        let Dims { n, d_in, d_out, r } = st.d;
        let shapes = [[n, d_in], [d_out, d_in], [r, d_in], [d_out, r]];
        let gs = backward(&st, slice(&grad), need);
        for ((parent, g), shape) in ops.parents.into_iter().zip(gs).zip(shapes) {
            if let (Some(p), Some(g)) = (parent, g) {
                grads.register::<Flex>(p.id, flex(g, shape));
            }
        }
    }
}

/// A LoRA side path: `A: [r, in]`, `B: [out, r]` and the scale.
pub type Side<B> = (Tensor<B, 2>, Tensor<B, 2>, f64);

type Inputs<B> = (Tensor<B, 2>, Tensor<B, 2>, Option<Side<B>>);

/// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` (or `x·Wᵀ` without a side path) for `x: [n, in]`, `W: [out, in]`,
/// as one node on `Autodiff<Flex>` (forward only on `Flex`), for f32 tensors. Other backends and
/// dtypes get the inputs back as `Err`, for the composition.
pub fn linear_lora<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    side: Option<Side<B>>,
) -> Result<Tensor<B, 2>, Inputs<B>> {
    let ty = TypeId::of::<B>();
    let f32s = x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && side
            .as_ref()
            .is_none_or(|(a, b, _)| a.dtype() == DType::F32 && b.dtype() == DType::F32);
    if !f32s || (ty != TypeId::of::<Ad>() && ty != TypeId::of::<Flex>()) {
        return Err((x, w, side));
    }
    let [n, d_in] = x.dims();
    let [d_out, _] = w.dims();
    let r = side.as_ref().map_or(0, |(a, _, _)| a.dims()[0]);
    let d = Dims { n, d_in, d_out, r };
    if ty == TypeId::of::<Ad>() {
        on_backend((x, w, side), move |(x, w, side): Inputs<Ad>| {
            tracked(d, x, w, side)
        })
    } else {
        on_backend((x, w, side), move |(x, w, side): Inputs<Flex>| {
            let (x, w) = (primitive(x).to_contiguous(), primitive(w).to_contiguous());
            let side = side.map(|(a, b, s)| {
                let (a, b) = (primitive(a).to_contiguous(), primitive(b).to_contiguous());
                (a, b, s as f32)
            });
            let lora = side.as_ref().map(|(a, b, s)| (slice(a), slice(b), *s));
            let (y, _) = forward(d, slice(&x), slice(&w), lora);
            Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(flex(y, [n, d_out])))
        })
    }
}

fn tracked(d: Dims, x: Tensor<Ad, 2>, w: Tensor<Ad, 2>, side: Option<Side<Ad>>) -> Tensor<Ad, 2> {
    let (xp, wp) = (primitive(x), primitive(w));
    let (xi, wi) = (xp.primitive.to_contiguous(), wp.primitive.to_contiguous());
    match side {
        None => {
            let (y, _) = forward(d, slice(&xi), slice(&wi), None);
            let y = flex(y, [d.n, d.d_out]);
            let node = match LinearBackward
                .prepare::<NoCheckpointing>([xp.node, wp.node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let st = State {
                        d,
                        x: xi,
                        w: wi,
                        lora: None,
                    };
                    prep.finish(Arc::new(st), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Tensor::from_primitive(TensorPrimitive::Float(node))
        }
        Some((a, b, s)) => {
            let (ap, bp) = (primitive(a), primitive(b));
            let (ai, bi) = (ap.primitive.to_contiguous(), bp.primitive.to_contiguous());
            let s = s as f32;
            let (y, xa) = forward(d, slice(&xi), slice(&wi), Some((slice(&ai), slice(&bi), s)));
            let y = flex(y, [d.n, d.d_out]);
            let node = match LinearBackward
                .prepare::<NoCheckpointing>([xp.node, wp.node, ap.node, bp.node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let st = State {
                        d,
                        x: xi,
                        w: wi,
                        lora: Some((ai, bi, s, xa)),
                    };
                    prep.finish(Arc::new(st), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Tensor::from_primitive(TensorPrimitive::Float(node))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution, Tensor, Tolerance};

    use super::{linear_lora, Ad};

    fn leaf(shape: [usize; 2], seed: u64) -> Tensor<Ad, 2> {
        <Ad as burn::tensor::backend::Backend>::seed(&Default::default(), seed);
        Tensor::<Ad, 2>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
            .require_grad()
    }

    fn twin(t: &Tensor<Ad, 2>, grad: bool) -> Tensor<Ad, 2> {
        let t = Tensor::<Ad, 2>::from_data(t.to_data(), &t.device());
        if grad {
            t.require_grad()
        } else {
            t
        }
    }

    fn close(what: &str, a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) {
        let (a, b) = (a.into_data(), b.into_data());
        assert_eq!(a.shape, b.shape, "{what}: shapes");
        a.assert_approx_eq::<f32>(&b, Tolerance::rel_abs(1e-5, 1e-5));
    }

    /// `Σ y·c` with a fixed non-uniform `c`.
    fn loss(y: Tensor<Ad, 2>) -> Tensor<Ad, 1> {
        let c = leaf(y.dims(), 99).detach();
        (y * c).sum()
    }

    /// Fused vs composition, forward and every tracked gradient, with and without a side path
    /// and with a frozen or trainable base (`n` not a multiple of gemm's blocks).
    fn check(lora: bool, train_w: bool) {
        let (n, d_in, d_out, r, s) = (37, 24, 20, 4, 2.5);
        let x = leaf([n, d_in], 1);
        let w = leaf([d_out, d_in], 2);
        let a = leaf([r, d_in], 3);
        let b = leaf([d_out, r], 4);
        let (xf, wf, af, bf) = (
            twin(&x, true),
            twin(&w, train_w),
            twin(&a, true),
            twin(&b, true),
        );
        let (xc, wc, ac, bc) = (
            twin(&x, true),
            twin(&w, train_w),
            twin(&a, true),
            twin(&b, true),
        );
        let side = lora.then(|| (af.clone(), bf.clone(), s));
        let fused = linear_lora(xf.clone(), wf.clone(), side)
            .unwrap_or_else(|_| panic!("the fused path is taken for f32 on Autodiff<Flex>"));
        let mut plain = xc.clone().matmul(wc.clone().transpose());
        if lora {
            let t = xc
                .clone()
                .matmul(ac.clone().transpose())
                .matmul(bc.clone().transpose());
            plain = plain + t.mul_scalar(s);
        }
        close("y", fused.clone().inner(), plain.clone().inner());
        let (gf, gc) = (loss(fused).backward(), loss(plain).backward());
        close("dx", xf.grad(&gf).expect("dx"), xc.grad(&gc).expect("dx"));
        assert_eq!(
            wf.grad(&gf).is_some(),
            train_w,
            "dW only for a trainable base"
        );
        if train_w {
            close("dw", wf.grad(&gf).expect("dw"), wc.grad(&gc).expect("dw"));
        }
        if lora {
            close("da", af.grad(&gf).expect("da"), ac.grad(&gc).expect("da"));
            close("db", bf.grad(&gf).expect("db"), bc.grad(&gc).expect("db"));
        }
    }

    #[test]
    fn fused_linear_matches_the_composition_and_its_gradients() {
        check(true, false); // LoRA on a frozen base
        check(true, true); // LoRA and a trainable base
        check(false, true); // full fine-tuning
        check(false, false); // a frozen layer (x's gradient only)
    }

    #[test]
    fn fused_linear_forward_on_flex_and_declined_cases() {
        let (x, w) = (leaf([5, 6], 1), leaf([3, 6], 2));
        let (a, b) = (leaf([2, 6], 3), leaf([3, 2], 4));
        let f = |t: &Tensor<Ad, 2>| Tensor::<Flex, 2>::from_data(t.to_data(), &Default::default());
        let y = linear_lora(f(&x), f(&w), Some((f(&a), f(&b), 0.5)))
            .unwrap_or_else(|_| panic!("the fused path is taken for f32 on Flex"));
        let t = f(&x).matmul(f(&a).transpose()).matmul(f(&b).transpose());
        let plain = f(&x).matmul(f(&w).transpose()) + t.mul_scalar(0.5);
        y.into_data()
            .assert_approx_eq::<f32>(&plain.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
        let low = linear_lora(x.cast(DType::BF16), w.cast(DType::BF16), None);
        assert!(low.is_err(), "bf16 keeps the composition");
    }
}
