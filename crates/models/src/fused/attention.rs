//! Rotary embedding + grouped-query attention + mask + softmax + value product as one op
//! ([`super::attention_kernel`]), with a hand-written backward pass on `Autodiff<Flex>` and a
//! forward-only path on `Flex` (evaluation). It replaces about 25 autodiff nodes per layer (the
//! head transposes, RoPE's slices and products, the K/V expansion, the score scale, the mask, the
//! softmax and the casts), none of which ran on more than one core, and it skips the key blocks a
//! query block may not see.
//!
//! bf16 inputs (mixed precision) are widened and the whole op runs in f32 — the rotary
//! embedding, the scores, the softmax and both products — with only the output and the input
//! gradients rounded to bf16, as fused attention kernels (PyTorch's CPU flash attention among
//! them) keep their inner arithmetic in f32. The bf16 composition instead rounds the rotated
//! heads, the scores and the probabilities too, so the fused op is the more accurate of the two.

use std::any::TypeId;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, Bool, DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use super::attention_kernel::{self as kernel, Dims, Mask, Rope, Saved};
use super::{
    f32_slice as slice, f32_values, flex_tensor, flex_tensor_in as flex, on_backend, primitive, Ad,
};
use crate::rope::RopeTables;

/// Everything the backward pass reads.
#[derive(Debug)]
struct State {
    d: Dims,
    saved: Saved,
    v: FlexTensor,
    rope: Rope,
    mask: Mask,
    scale: f32,
    /// The inputs' (and so the gradients') dtype.
    dtype: DType,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pq, pk, pv] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let (dq, dk, dv) = kernel::backward(
            st.d,
            &st.saved,
            slice(&st.v),
            &f32_values(&grad),
            &st.rope,
            &st.mask,
            st.scale,
        );
        let Dims { b, s, h, kv, hd } = st.d;
        for (parent, g, width) in [(pq, dq, h * hd), (pk, dk, kv * hd), (pv, dv, kv * hd)] {
            if let Some(p) = parent {
                grads.register::<Flex>(p.id, flex(g, [b, s, width], st.dtype));
            }
        }
    }
}

/// Host copies of the rotary tables and the mask, and the sizes, for `q: [b, s, h·hd]`.
struct Host {
    d: Dims,
    rope: Rope,
    mask: Mask,
}

impl Host {
    fn new<B: Backend>(
        d: Dims,
        rope: &RopeTables<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        window: Option<usize>,
    ) -> Option<Self> {
        let table = |t: &Tensor<B, 4>| t.to_data().convert::<f32>().to_vec::<f32>().ok();
        let rope = Rope {
            cos: table(&rope.cos)?,
            sin: table(&rope.sin)?,
        };
        let forbidden = match mask {
            Some(m) if m.dims() == [d.b, 1, d.s, d.s] => m.to_data().to_vec::<bool>().ok()?,
            Some(_) => return None,
            None => vec![false; d.b * d.s * d.s],
        };
        let mask = Mask::new(forbidden, d, window)?;
        Some(Host { d, rope, mask })
    }
}

type Qkv<B> = (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>);

/// `softmax(rope(q)·rope(k)ᵀ·scale, masked)·v` per head, heads of `k`/`v` shared by `h / kv`
/// query heads: `q: [b, s, h·hd]`, `k`, `v: [b, s, kv·hd]` (the projections' outputs), result
/// `[b, s, h·hd]`. `mask` is `[b, 1, s, s]`, true where forbidden, `window` a sliding window.
///
/// Taken on `Autodiff<Flex>` (training) and `Flex` (evaluation) for f32 or bf16 inputs whose
/// every query may see some key; otherwise the inputs come back as `Err` for the plain
/// composition.
pub(crate) fn attention<B: Backend>(
    (q, k, v): Qkv<B>,
    rope: &RopeTables<B>,
    mask: Option<&Tensor<B, 4, Bool>>,
    window: Option<usize>,
    (h, kv, hd): (usize, usize, usize),
) -> Result<Tensor<B, 3>, Qkv<B>> {
    let ty = TypeId::of::<B>();
    let dtype = q.dtype();
    let dtypes =
        matches!(dtype, DType::F32 | DType::BF16) && k.dtype() == dtype && v.dtype() == dtype;
    if !dtypes || (ty != TypeId::of::<Ad>() && ty != TypeId::of::<Flex>()) {
        return Err((q, k, v));
    }
    let [b, s, _] = q.dims();
    let d = Dims { b, s, h, kv, hd };
    let Some(host) = Host::new(d, rope, mask, window) else {
        return Err((q, k, v));
    };
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    if ty == TypeId::of::<Ad>() {
        on_backend((q, k, v), move |(q, k, v): Qkv<Ad>| {
            autodiff(q, k, v, host, scale)
        })
    } else {
        on_backend((q, k, v), |(q, k, v): Qkv<Flex>| {
            plain(q, k, v, &host, scale)
        })
    }
}

/// The forward pass alone (no autodiff).
fn plain(
    q: Tensor<Flex, 3>,
    k: Tensor<Flex, 3>,
    v: Tensor<Flex, 3>,
    host: &Host,
    scale: f32,
) -> Tensor<Flex, 3> {
    let (q, k, v) = (
        primitive(q).to_contiguous(),
        primitive(k).to_contiguous(),
        primitive(v).to_contiguous(),
    );
    let Dims { b, s, h, hd, .. } = host.d;
    let (out, _) = kernel::forward(
        host.d,
        (&f32_values(&q), &f32_values(&k), &f32_values(&v)),
        &host.rope,
        &host.mask,
        scale,
        false,
    );
    let y = flex(out, [b, s, h * hd], q.dtype());
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// The forward pass as one autodiff node.
fn autodiff(
    q: Tensor<Ad, 3>,
    k: Tensor<Ad, 3>,
    v: Tensor<Ad, 3>,
    host: Host,
    scale: f32,
) -> Tensor<Ad, 3> {
    let (qp, kp, vp) = (primitive(q), primitive(k), primitive(v));
    let (qi, ki, vi) = (
        qp.primitive.to_contiguous(),
        kp.primitive.to_contiguous(),
        vp.primitive.to_contiguous(),
    );
    let Dims { b, s, h, hd, .. } = host.d;
    let prep = AttentionBackward
        .prepare::<NoCheckpointing>([qp.node, kp.node, vp.node])
        .compute_bound()
        .stateful();
    let tracked = matches!(prep, OpsKind::Tracked(_));
    let dtype = qi.dtype();
    let v = f32_values(&vi);
    let (out, saved) = kernel::forward(
        host.d,
        (&f32_values(&qi), &f32_values(&ki), &v),
        &host.rope,
        &host.mask,
        scale,
        tracked,
    );
    let y = flex(out, [b, s, h * hd], dtype);
    // The backward pass reads `v` in f32.
    let v = match v {
        std::borrow::Cow::Owned(v) => flex_tensor(v, [b, s, host.d.kv * hd]),
        std::borrow::Cow::Borrowed(_) => vi.clone(),
    };
    let out = match (prep, saved) {
        (OpsKind::Tracked(prep), Some(saved)) => {
            let state = State {
                d: host.d,
                saved,
                v,
                rope: host.rope,
                mask: host.mask,
                scale,
                dtype,
            };
            prep.finish(Arc::new(state), y)
        }
        (OpsKind::Tracked(_), None) => unreachable!("a tracked op saves its state"),
        (OpsKind::UnTracked(prep), _) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Bool, DType, Tensor, TensorData};

    use super::super::testing::{assert_close, leaf, loss, twin};
    use super::{attention, Ad};
    use crate::attention::attend;
    use crate::model::attention_mask;
    use crate::rope::RopeTables;

    /// Two packed documents per row (positions restart), `s` not a multiple of the block.
    fn setup<B: burn::tensor::backend::Backend>(
        b: usize,
        s: usize,
        hd: usize,
    ) -> (RopeTables<B>, Tensor<B, 4, Bool>) {
        let dev = Default::default();
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let cut = s / 3 + 1;
        let seg: Vec<u32> = (0..b * s).map(|p| 1 + u32::from(p % s >= cut)).collect();
        let pos: Vec<u32> = (0..b * s)
            .map(|p| (if p % s >= cut { p % s - cut } else { p % s }) as u32)
            .collect();
        let rope = RopeTables::new(&inv, &pos, b, s, &dev);
        (rope, attention_mask::<B>(Some(&seg), b, s, &dev))
    }

    fn check(b: usize, s: usize, (h, kv, hd): (usize, usize, usize), window: Option<usize>) {
        let (rope, mask) = setup::<Ad>(b, s, hd);
        let q = leaf([b, s, h * hd], DType::F32, 1);
        let k = leaf([b, s, kv * hd], DType::F32, 2);
        let v = leaf([b, s, kv * hd], DType::F32, 3);
        let (qa, ka, va) = (twin(&q), twin(&k), twin(&v));
        let (qb, kb, vb) = (twin(&q), twin(&k), twin(&v));
        let fused = attention(
            (qa.clone(), ka.clone(), va.clone()),
            &rope,
            Some(&mask),
            window,
            (h, kv, hd),
        )
        .unwrap_or_else(|_| panic!("the fused path is taken for f32 on Autodiff<Flex>"));
        let plain = attend(
            (qb.clone(), kb.clone(), vb.clone()),
            &rope,
            Some(&mask),
            window,
            (h, kv, hd),
            None,
        );
        assert_close("out", fused.clone(), plain.clone(), 1e-5, 1e-4);
        let (ga, gb) = (loss(fused).backward(), loss(plain).backward());
        for (what, a, b) in [("dq", &qa, &qb), ("dk", &ka, &kb), ("dv", &va, &vb)] {
            let (da, db) = (a.grad(&ga).expect(what), b.grad(&gb).expect(what));
            assert_close(what, da, db, 1e-5, 1e-4);
        }
    }

    #[test]
    fn fused_attention_matches_the_composition_and_its_gradients() {
        // Grouped query heads, two query blocks (the second partial), packed documents.
        check(2, 70, (4, 2, 8), None);
        // One kv head per query head, a sliding window, a single partial block.
        check(1, 33, (2, 2, 16), Some(5));
        // Multi-query attention (one kv head), three blocks.
        check(1, 150, (3, 1, 4), None);
    }

    /// bf16 inputs: the fused op is the f32 computation on the widened inputs with its output
    /// and gradients rounded to bf16 (within one bf16 rounding of the f32 composition), and
    /// within bf16 noise of the bf16 composition, which also rounds its intermediates.
    #[test]
    fn fused_attention_in_bf16_is_the_f32_op_rounded() {
        let (b, s, (h, kv, hd)) = (2, 70, (4, 2, 8));
        let (rope, mask) = setup::<Ad>(b, s, hd);
        let bf = DType::BF16;
        let q = leaf([b, s, h * hd], bf, 1);
        let k = leaf([b, s, kv * hd], bf, 2);
        let v = leaf([b, s, kv * hd], bf, 3);
        let (qa, ka, va) = (twin(&q), twin(&k), twin(&v));
        let wide = |t: &Tensor<Ad, 3>| twin(&t.clone().cast(DType::F32));
        let (qb, kb, vb) = (wide(&q), wide(&k), wide(&v));
        let (qc, kc, vc) = (twin(&q), twin(&k), twin(&v));
        let dims = (h, kv, hd);
        let fused = attention(
            (qa.clone(), ka.clone(), va.clone()),
            &rope,
            Some(&mask),
            None,
            dims,
        )
        .unwrap_or_else(|_| panic!("the fused path is taken for bf16 on Autodiff<Flex>"));
        assert_eq!(fused.dtype(), bf);
        let f32_ref = attend(
            (qb.clone(), kb.clone(), vb.clone()),
            &rope,
            Some(&mask),
            None,
            dims,
            None,
        );
        let bf16_ref = attend(
            (qc.clone(), kc.clone(), vc.clone()),
            &rope,
            Some(&mask),
            None,
            dims,
            None,
        );
        let rounded = |t: Tensor<Ad, 3>| t.cast(bf);
        assert_close("out", fused.clone(), rounded(f32_ref.clone()), 1e-3, 8e-3);
        assert_close("out vs bf16", fused.clone(), bf16_ref.clone(), 3e-2, 3e-2);
        let (ga, gb, gc) = (
            loss(fused).backward(),
            // The same upstream gradient as the bf16 output gets: `c` rounded to bf16.
            loss(rounded(f32_ref)).backward(),
            loss(bf16_ref).backward(),
        );
        for (what, a, bb, c) in [
            ("dq", &qa, &qb, &qc),
            ("dk", &ka, &kb, &kc),
            ("dv", &va, &vb, &vc),
        ] {
            let da = a.grad(&ga).expect(what);
            assert_eq!(da.dtype(), bf, "{what} in the input's dtype");
            let db = bb.grad(&gb).expect(what).cast(bf);
            assert_close(what, da.clone(), db, 1e-3, 8e-3);
            assert_close(what, da, c.grad(&gc).expect(what), 6e-2, 6e-2);
        }
    }

    #[test]
    fn fused_attention_without_autodiff_matches_the_composition() {
        let (b, s, (h, kv, hd)) = (2, 70, (4, 2, 8));
        let (rope, mask) = setup::<Flex>(b, s, hd);
        let data = |seed, w| leaf([b, s, w], DType::F32, seed).into_data();
        let t = |d: TensorData| Tensor::<Flex, 3>::from_data(d, &Default::default());
        let (q, k, v) = (data(1, h * hd), data(2, kv * hd), data(3, kv * hd));
        let fused = attention(
            (t(q.clone()), t(k.clone()), t(v.clone())),
            &rope,
            Some(&mask),
            None,
            (h, kv, hd),
        )
        .unwrap_or_else(|_| panic!("the fused path is taken for f32 on Flex"));
        let plain = attend(
            (t(q), t(k), t(v)),
            &rope,
            Some(&mask),
            None,
            (h, kv, hd),
            None,
        );
        assert_close("out", fused, plain, 1e-5, 1e-4);
    }

    #[test]
    fn fused_attention_declines_what_it_does_not_compute() {
        let (b, s, hd) = (1, 4, 8);
        let (rope, _) = setup::<Ad>(b, s, hd);
        let qkv = || {
            (
                leaf([b, s, hd], DType::F32, 1),
                leaf([b, s, hd], DType::F32, 2),
                leaf([b, s, hd], DType::F32, 3),
            )
        };
        // A query that may see no key: its softmax is left to the composition.
        let mut m = vec![false; s * s];
        m[..s].fill(true);
        let blind =
            Tensor::<Ad, 4, Bool>::from_data(TensorData::new(m, [1, 1, s, s]), &Default::default());
        assert!(attention(qkv(), &rope, Some(&blind), None, (1, 1, hd)).is_err());
        // Half precision keeps the composition.
        let (q, k, v) = qkv();
        let half = (q.cast(DType::F16), k.cast(DType::F16), v.cast(DType::F16));
        assert!(attention(half, &rope, None, None, (1, 1, hd)).is_err());
    }
}
