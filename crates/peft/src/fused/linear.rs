//! `y = x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ)` — a dense linear layer with an optional LoRA side path — as one
//! op: the products straight on the row-major buffers (W, A, B used transposed in place), the
//! side path added in one parallel pass, and a hand-written backward pass
//! (`dX = dY·W + (s·dY·B)·A`, `dW = dYᵀ·X`, `dB = (s·dY)ᵀ·(X·Aᵀ)`, `dA = (s·dY·B)ᵀ·X`) that
//! computes only the gradients some parent needs. It replaces burn's matmul, transpose, scale and
//! add nodes, whose outputs Flex allocates twice (zeroed, then copied to an aligned buffer).
//!
//! Two precisions, the dtype of `x` choosing:
//! - **f32**: `gemm`'s f32 kernels for `x·Wᵀ` and `dY·W`; the LoRA side path's thin products on
//!   AVX-512 kernels of their own ([`super::lora_side`], block by block of rows), which sum in
//!   another order than `gemm` (so the op and the composition agree to rounding, not to the
//!   bit), or on `gemm` where the CPU lacks AVX-512.
//! - **bf16** (mixed precision): the bf16 dot-product kernel ([`super::product_bf16`]) reads f32
//!   master weights and rounds them while packing (no cast node, no bf16 copy of the weight), and
//!   every intermediate is rounded to bf16 where the composition's bf16 tensors are: each
//!   product, `t·s` (with `s` itself rounded, as Flex's bf16 scalar ops do), the sums, and each
//!   gradient, which reaches an f32 master weight as the f32 value of its bf16 gradient (the
//!   composition's cast node does the same). Results leave the kernel rounded, the side path
//!   added there ([`super::epilogue`]); the packed `x` (shared by the projections that read
//!   it) and a frozen `W` are kept for the next product that reads them
//!   ([`super::pack_cache`]).
//!
//! The arithmetic of each step is the composition's (products, then `t·s`, then `y + t`), so the
//! two agree to rounding in the products' summation order.

use std::any::TypeId;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, bf16, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::bf16_gemm::{
    product_bf16_of, product_bf16_rounded_of, product_bf16_side_of, Bf16Operand, Operand,
    Side as SideProduct,
};
use super::gemm::product;
use super::lora_side;
use super::pack_cache::Owner;
use super::simd::{map, wide};
use super::{flex_tensor_in as flex, on_backend, primitive, Ad};
use crate::nf4::Nf4Weight;
use burn::module::AutodiffModule;

/// Elements per task of the element-wise passes.
const CHUNK: usize = 1 << 14;

/// Sizes: `n` rows of `x`, `W: [d_out, d_in]`, adapter rank `r` (0 without one), and whether
/// the op computes in bf16.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    low: bool,
}

/// The elements of a contiguous operand in either of the dtypes the op reads.
#[derive(Clone, Copy)]
enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// An operand, and the owner of its storage where its packed form may be kept for the op's
/// other products ([`super::pack_cache`]: bf16 only).
#[derive(Clone, Copy)]
struct Src<'a> {
    e: Elems<'a>,
    owner: Option<&'a Owner>,
}

impl<'a> Src<'a> {
    /// The elements of a contiguous f32 or bf16 tensor.
    fn of(t: &'a FlexTensor) -> Self {
        Src::kept(t, None)
    }

    /// [`Self::of`], kept under `owner` (the tensor's storage) when given.
    fn kept(t: &'a FlexTensor, owner: Option<&'a Owner>) -> Self {
        let e = match t.dtype() {
            DType::BF16 => Elems::Bf16(t.as_slice().expect("contiguous bf16")),
            _ => Elems::F32(t.as_slice().expect("contiguous f32")),
        };
        Src { e, owner }
    }

    fn f32(v: &'a [f32]) -> Self {
        Src {
            e: Elems::F32(v),
            owner: None,
        }
    }

    fn bf16(v: &'a [bf16]) -> Self {
        Src {
            e: Elems::Bf16(v),
            owner: None,
        }
    }
}

/// The storage owner of a tensor whose packed form the op keeps.
fn owner(t: &FlexTensor) -> Owner {
    t.data_arc()
}

/// `x` rounded to bf16 and widened back, as Flex rounds a bf16 op's f32 result
/// (`bf16::from_f32`, nearest even).
fn rne(x: f32) -> f32 {
    super::bits::round(x)
}

/// `v` rounded to bf16 in place (the values a bf16 product's tensor would hold), in parallel.
fn round_bf16(v: &mut [f32]) {
    v.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|x| *x = rne(*x)));
}

/// `v`, rounded to bf16 when `low`: an f32 master weight's gradient, the f32 value of the
/// composition's bf16 gradient.
fn rounded(low: bool, mut v: Vec<f32>) -> Vec<f32> {
    if low {
        round_bf16(&mut v);
    }
    v
}

/// Views of row-major operands, for `x·Mᵀ`, `x·M` and `aᵀ·b`: `(lhs strides, rhs strides,
/// (rows, k, cols))`.
type Layout = ((usize, usize), (usize, usize), (usize, usize, usize));

/// `x·Mᵀ` for row-major `x: [rows, k]` and `M: [cols, k]` (read transposed in place).
fn xm_t(rows: usize, k: usize, cols: usize) -> Layout {
    ((k, 1), (1, k), (rows, k, cols))
}

/// `x·M` for row-major `x: [rows, k]` and `M: [k, cols]`.
fn xm(rows: usize, k: usize, cols: usize) -> Layout {
    ((k, 1), (cols, 1), (rows, k, cols))
}

/// `aᵀ·b` for row-major `a: [k, rows]` (read transposed in place) and `b: [k, cols]`.
fn a_tb(k: usize, rows: usize, cols: usize) -> Layout {
    ((1, rows), (cols, 1), (rows, k, cols))
}

/// `l · r` in `layout`: f32, or bf16 products summed in f32 when `low` — not rounded.
fn prod(low: bool, l: Src, r: Src, (ls, rs, dims): Layout) -> Vec<f32> {
    use Elems::{Bf16, F32};
    let (lo, ro) = (l.owner, r.owner);
    match (l.e, r.e) {
        (F32(l), F32(r)) if !low => product(l, ls, r, rs, dims),
        (F32(l), F32(r)) => product_bf16_of(op(l, ls, lo), op(r, rs, ro), dims),
        (F32(l), Bf16(r)) => product_bf16_of(op(l, ls, lo), op(r, rs, ro), dims),
        (Bf16(l), F32(r)) => product_bf16_of(op(l, ls, lo), op(r, rs, ro), dims),
        (Bf16(l), Bf16(r)) => product_bf16_of(op(l, ls, lo), op(r, rs, ro), dims),
    }
}

/// A LoRA side path to add to a bf16 product: `scale · (l · r)` for bf16 `l` and `r` in
/// `layout` (`x·Aᵀ` and `B`, or `dY·s·B` and `A`).
type SidePath<'a> = (&'a [bf16], &'a [bf16], Layout, f32);

/// The bf16 product `l · r` in `layout`, rounded to bf16 as it leaves the kernel, with an
/// optional side path added there ([`product_bf16_side_of`]): a bf16 tensor's values.
fn prod_bf16(l: Src, r: Src, (ls, rs, dims): Layout, side: Option<SidePath>) -> Vec<bf16> {
    use Elems::{Bf16, F32};
    let (lo, ro) = (l.owner, r.owner);
    match (l.e, r.e) {
        (F32(l), F32(r)) => prod_bf16_of(op(l, ls, lo), op(r, rs, ro), dims, side),
        (F32(l), Bf16(r)) => prod_bf16_of(op(l, ls, lo), op(r, rs, ro), dims, side),
        (Bf16(l), F32(r)) => prod_bf16_of(op(l, ls, lo), op(r, rs, ro), dims, side),
        (Bf16(l), Bf16(r)) => prod_bf16_of(op(l, ls, lo), op(r, rs, ro), dims, side),
    }
}

/// [`prod_bf16`] on typed operands.
fn prod_bf16_of<L: Bf16Operand, R: Bf16Operand>(
    l: Operand<L>,
    r: Operand<R>,
    dims: (usize, usize, usize),
    side: Option<SidePath>,
) -> Vec<bf16> {
    match side {
        None => product_bf16_rounded_of(l, r, dims, None),
        Some((sl, sr, (sls, srs, (_, k, _)), scale)) => {
            let side = SideProduct {
                lhs: Operand::new(sl, sls),
                rhs: Operand::new(sr, srs),
                k,
                scale,
            };
            product_bf16_side_of(l, r, dims, side)
        }
    }
}

/// A small operand (an adapter matrix) as bf16, rounded as the packing rounds an f32 value
/// ([`super::bits::cast_bits`]): what a product reading it would use.
fn bf16_values(v: Src<'_>) -> std::borrow::Cow<'_, [bf16]> {
    match v.e {
        Elems::Bf16(v) => std::borrow::Cow::Borrowed(v),
        Elems::F32(v) => std::borrow::Cow::Owned(
            v.iter()
                .map(|&x| bf16::from_bits(super::bits::cast_bits(x)))
                .collect(),
        ),
    }
}

/// A product operand from its parts.
fn op<'a, T>(values: &'a [T], strides: (usize, usize), owner: Option<&'a Owner>) -> Operand<'a, T> {
    Operand {
        values,
        strides,
        owner,
    }
}

/// The side path's sizes for [`lora_side`].
fn side_shape(d: Dims) -> lora_side::Shape {
    lora_side::Shape {
        n: d.n,
        d_in: d.d_in,
        d_out: d.d_out,
        r: d.r,
    }
}

/// `y ← y + t·s` element-wise, in parallel and vectorised: the composition's
/// `y + t.mul_scalar(s)` in f32, rounding for rounding.
fn add_scaled(y: &mut [f32], t: &[f32], s: f32) {
    y.par_chunks_mut(CHUNK)
        .zip(t.par_chunks(CHUNK))
        .for_each(|(y, t)| {
            wide(
                #[inline(always)]
                || y.iter_mut().zip(t).for_each(|(y, &t)| *y += t * s),
            )
        });
}

/// The op's scale: Flex's bf16 scalar ops round theirs first (`bf16::from_f32(s as f32)`).
fn scale(low: bool, s: f64) -> f32 {
    if low {
        rne(s as f32)
    } else {
        s as f32
    }
}

/// Values the op made: f32 (rounded on the way out when their tensor is bf16), or bf16 that
/// the kernel rounded as it stored them.
#[derive(Debug)]
enum Vals {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Vals {
    fn src(&self) -> Src<'_> {
        match self {
            Vals::F32(v) => Src::f32(v),
            Vals::Bf16(v) => Src::bf16(v),
        }
    }

    /// A `shape` tensor of these values in `dtype`: f32 values rounded to nearest even when
    /// `dtype` is bf16, bf16 values widened when it is f32.
    fn into_flex(self, shape: [usize; 2], dtype: DType) -> FlexTensor {
        match (self, dtype) {
            (Vals::F32(v), dt) => flex(v, shape, dt),
            (Vals::Bf16(v), DType::BF16) => FlexTensor::from_data(TensorData::new(v, shape)),
            (Vals::Bf16(v), dt) => flex(super::bits::to_f32(&v), shape, dt),
        }
    }
}

/// The forward pass: `y` and, with an adapter, `x·Aᵀ` (kept for the backward pass). In bf16
/// every product is rounded as it leaves the kernel, `y` with the side path added there.
fn forward(d: Dims, x: Src, w: Src, lora: Option<(Src, Src, f32)>) -> (Vals, Option<Vals>) {
    let Dims {
        n,
        d_in,
        d_out,
        r,
        low,
    } = d;
    if !low {
        return match lora {
            None => (Vals::F32(prod(false, x, w, xm_t(n, d_in, d_out))), None),
            Some((a, b, s)) => {
                let mut y = prod(false, x, w, xm_t(n, d_in, d_out));
                if let (Elems::F32(xv), Elems::F32(av), Elems::F32(bv)) = (x.e, a.e, b.e) {
                    if lora_side::applies(r) {
                        let sh = side_shape(d);
                        let (xv, av, bv) = (&xv[..n * d_in], &av[..r * d_in], &bv[..d_out * r]);
                        let xa = lora_side::forward(sh, xv, av, bv, s, &mut y);
                        return (Vals::F32(y), Some(Vals::F32(xa)));
                    }
                }
                let xa = prod(false, x, a, xm_t(n, d_in, r));
                let t = prod(false, Src::f32(&xa), b, xm_t(n, r, d_out));
                add_scaled(&mut y, &t, s);
                (Vals::F32(y), Some(Vals::F32(xa)))
            }
        };
    }
    let Some((a, b, s)) = lora else {
        return (
            Vals::Bf16(prod_bf16(x, w, xm_t(n, d_in, d_out), None)),
            None,
        );
    };
    let xa = prod_bf16(x, a, xm_t(n, d_in, r), None);
    let b = bf16_values(b);
    let side = (&xa[..], &b[..], xm_t(n, r, d_out), s);
    let y = prod_bf16(x, w, xm_t(n, d_in, d_out), Some(side));
    (Vals::Bf16(y), Some(Vals::Bf16(xa)))
}

/// The base weight the backward pass reads: the tensor, or an NF4 weight (QLoRA), dequantized
/// again there rather than kept dense from the forward pass (as bitsandbytes' `MatMul4Bit`).
#[derive(Debug)]
enum Weight {
    Dense(FlexTensor),
    Nf4(Box<Nf4Weight<Flex>>),
}

impl Weight {
    /// The dense weight (an NF4 one dequantized, f32).
    fn dense(&self) -> FlexTensor {
        match self {
            Weight::Dense(w) => w.clone(),
            Weight::Nf4(q) => primitive(q.dequantize()).to_contiguous(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Weight::Dense(w) => w.dtype(),
            Weight::Nf4(_) => DType::F32,
        }
    }
}

/// What the backward pass reads.
#[derive(Debug)]
struct State {
    d: Dims,
    x: FlexTensor,
    w: Weight,
    /// A, B, the scale and `x·Aᵀ`, with an adapter.
    lora: Option<(FlexTensor, FlexTensor, f32, Vals)>,
    /// The storage owners of `x` and `W` where their packed forms are kept.
    owners: Owners,
}

/// Owners of `x`'s and `W`'s storage, for the bf16 products' kept packs: `x` feeds several
/// projections (q, k, v, and each one's adapter), a frozen `W` is the same every step.
#[derive(Debug, Default)]
struct Owners {
    x: Option<Owner>,
    w: Option<Owner>,
}

impl Owners {
    /// In bf16: always `x`'s, and `W`'s when it is frozen.
    fn of(low: bool, x: &FlexTensor, w: &FlexTensor, w_frozen: bool) -> Self {
        Owners {
            x: low.then(|| owner(x)),
            w: (low && w_frozen).then(|| owner(w)),
        }
    }
}

/// `dY·s`, the composition's backward of `t.mul_scalar(s)`, rounded to bf16 when `low`.
fn scaled_grad(low: bool, dy: Src, s: f32) -> Vals {
    use super::bits::{round_bits, widen};
    match (dy.e, low) {
        (Elems::F32(g), false) => Vals::F32(map(g, |g| g * s)),
        (Elems::F32(g), true) => Vals::Bf16(map(g, |g| bf16::from_bits(round_bits(g * s)))),
        (Elems::Bf16(g), _) => Vals::Bf16(map(g, |g| {
            bf16::from_bits(round_bits(widen(g.to_bits()) * s))
        })),
    }
}

/// Whether `dY·s` may be left out and `s` moved onto the two small operands it meets instead
/// (`B` in `(dY·s)·B` and `x·Aᵀ` in `(dY·s)ᵀ·(x·Aᵀ)`): `s` a power of two ≥ 1 (PEFT's usual
/// `alpha = r` or `2r`), so that scaling commutes with every rounding — the products are the
/// same exact values either way, overflow aside — and `dY` f32 or, in bf16, a bf16 tensor
/// (an f32 `dY` would be rounded by the packing's cast instead of the scaling's nearest even).
fn scale_moves(low: bool, dy: Src, s: f32) -> bool {
    let pow2 = s >= 1.0 && s.is_finite() && s.to_bits() & 0x007f_ffff == 0;
    pow2 && (!low || matches!(dy.e, Elems::Bf16(_)))
}

/// Gradients `[dX, dW, dA, dB]` for the parents that need them; in bf16 `dX` comes rounded
/// from the kernel, the weights' gradients are rounded on the way out.
fn backward(st: &State, dy: Src, need: [bool; 4]) -> [Option<Vals>; 4] {
    let Dims {
        n,
        d_in,
        d_out,
        r,
        low,
    } = st.d;
    let x = Src::kept(&st.x, st.owners.x.as_ref());
    // Only `dX` reads the weight: an NF4 one is dequantized for it alone.
    let wt = match (&st.w, need[0]) {
        (Weight::Nf4(_), false) => None,
        (w, _) => Some(w.dense()),
    };
    let w = wt.as_ref().map(|w| Src::kept(w, st.owners.w.as_ref()));
    let w = || w.expect("dX reads the weight");
    let g = dy;
    let dw = need[1].then(|| Vals::F32(prod(low, g, x, a_tb(n, d_out, d_in))));
    let Some((a, b, s, xa)) = &st.lora else {
        let dx = need[0].then(|| match low {
            true => Vals::Bf16(prod_bf16(g, w(), xm(n, d_out, d_in), None)),
            false => Vals::F32(prod(false, g, w(), xm(n, d_out, d_in))),
        });
        return [dx, dw, None, None];
    };
    let (a, b) = (Src::of(a), Src::of(b));
    // `dY·s` and the operands it meets: `(dY·s)·B` and `(dY·s)ᵀ·(x·Aᵀ)`, or, with the scale
    // moved ([`scale_moves`]), `dY·(s·B)` and `dYᵀ·(s·x·Aᵀ)`.
    let moved = scale_moves(low, g, *s);
    let gs = (!moved).then(|| scaled_grad(low, g, *s));
    // `scaled_grad` without rounding an f32 operand: `v·s` in `v`'s dtype, exact here.
    let sb = moved.then(|| scaled_grad(false, b, *s));
    let sxa = moved.then(|| scaled_grad(false, xa.src(), *s));
    let gs = gs.as_ref().map_or(g, Vals::src);
    let b = sb.as_ref().map_or(b, Vals::src);
    let xa = sxa.as_ref().map_or(xa.src(), Vals::src);
    if !low && lora_side::applies(r) {
        use Elems::F32;
        if let (F32(gv), F32(bv), F32(av), F32(xv), F32(xav)) = (gs.e, b.e, a.e, x.e, xa.e) {
            if !(need[0] || need[2] || need[3]) {
                return [None, dw, None, None];
            }
            let mut dx = need[0].then(|| prod(false, g, w(), xm(n, d_out, d_in)));
            let grads = lora_side::Grads {
                g: &gv[..n * d_out],
                b: &bv[..d_out * r],
                a: &av[..r * d_in],
                x: &xv[..n * d_in],
                xa: &xav[..n * r],
            };
            let (da, db) =
                lora_side::backward(side_shape(st.d), grads, dx.as_deref_mut(), need[2], need[3]);
            return [dx.map(Vals::F32), dw, da.map(Vals::F32), db.map(Vals::F32)];
        }
    }
    let (mut dx, mut da) = (None, None);
    if need[0] || need[2] {
        // The side path's gradient at `x·Aᵀ`: a bf16 tensor of the composition when `low`.
        let dxa = match low {
            true => Vals::Bf16(prod_bf16(gs, b, xm(n, d_out, r), None)),
            false => Vals::F32(prod(false, gs, b, xm(n, d_out, r))),
        };
        if need[0] {
            dx = Some(match &dxa {
                Vals::Bf16(dxa) => {
                    let a = bf16_values(a);
                    let side = (&dxa[..], &a[..], xm(n, r, d_in), 1.0);
                    Vals::Bf16(prod_bf16(g, w(), xm(n, d_out, d_in), Some(side)))
                }
                Vals::F32(_) => {
                    let side = prod(low, dxa.src(), a, xm(n, r, d_in));
                    let mut dx = prod(false, g, w(), xm(n, d_out, d_in));
                    add_scaled(&mut dx, &side, 1.0);
                    Vals::F32(dx)
                }
            });
        }
        if need[2] {
            da = Some(Vals::F32(prod(low, dxa.src(), x, a_tb(n, r, d_in))));
        }
    }
    let db = need[3].then(|| Vals::F32(prod(low, gs, xa, a_tb(n, d_out, r))));
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
        let Dims {
            n, d_in, d_out, r, ..
        } = st.d;
        let shapes = [[n, d_in], [d_out, d_in], [r, d_in], [d_out, r]];
        let dtypes = [
            Some(st.x.dtype()),
            Some(st.w.dtype()),
            st.lora.as_ref().map(|l| l.0.dtype()),
            st.lora.as_ref().map(|l| l.1.dtype()),
        ];
        let gs = backward(&st, Src::of(&grad), need);
        for (((parent, g), shape), dt) in ops.parents.into_iter().zip(gs).zip(shapes).zip(dtypes) {
            if let (Some(p), Some(g), Some(dt)) = (parent, g, dt) {
                // bf16 gradients round on conversion; an f32 master's gets its bf16 value.
                let g = match g {
                    Vals::F32(g) if dt == DType::F32 => Vals::F32(rounded(st.d.low, g)),
                    g => g,
                };
                grads.register::<Flex>(p.id, g.into_flex(shape, dt));
            }
        }
    }
}

/// A LoRA side path: `A: [r, in]`, `B: [out, r]` and the scale.
pub type Side<B> = (Tensor<B, 2>, Tensor<B, 2>, f64);

type Inputs<B> = (Tensor<B, 2>, Tensor<B, 2>, Option<Side<B>>);

/// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` (or `x·Wᵀ` without a side path) for `x: [n, in]`, `W: [out, in]`,
/// as one node on `Autodiff<Flex>` (forward only on `Flex`), computed in `x`'s dtype: f32
/// (every operand f32), or bf16 with f32 or bf16 weights (mixed precision; the output and
/// `x`'s gradient bf16, each weight's gradient in the weight's dtype). Other backends and
/// dtypes get the inputs back as `Err`, for the composition.
pub fn linear_lora<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    side: Option<Side<B>>,
) -> Result<Tensor<B, 2>, Inputs<B>> {
    let ty = TypeId::of::<B>();
    let low = x.dtype() == DType::BF16;
    let dtypes = computes(low, &x, Some(&w), side.as_ref());
    if !dtypes || (ty != TypeId::of::<Ad>() && ty != TypeId::of::<Flex>()) {
        return Err((x, w, side));
    }
    let [n, d_in] = x.dims();
    let [d_out, _] = w.dims();
    let r = side.as_ref().map_or(0, |(a, _, _)| a.dims()[0]);
    let d = Dims {
        n,
        d_in,
        d_out,
        r,
        low,
    };
    let out_dtype = x.dtype();
    if ty == TypeId::of::<Ad>() {
        on_backend((x, w, side), move |(x, w, side): Inputs<Ad>| {
            tracked(d, x, w, side, None)
        })
    } else {
        on_backend((x, w, side), move |(x, w, side): Inputs<Flex>| {
            let (x, w) = (primitive(x).to_contiguous(), primitive(w).to_contiguous());
            let side = side.map(|(a, b, s)| {
                let (a, b) = (primitive(a).to_contiguous(), primitive(b).to_contiguous());
                (a, b, scale(low, s))
            });
            let lora = side.as_ref().map(|(a, b, s)| (Src::of(a), Src::of(b), *s));
            let (y, _) = forward(d, Src::of(&x), Src::of(&w), lora);
            Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(
                y.into_flex([n, d_out], out_dtype),
            ))
        })
    }
}

/// Whether the op computes with these operands: all f32, or (`low`, mixed precision) each f32
/// or bf16.
fn computes<B: Backend>(
    low: bool,
    x: &Tensor<B, 2>,
    w: Option<&Tensor<B, 2>>,
    side: Option<&Side<B>>,
) -> bool {
    let ok = |t: &Tensor<B, 2>| match t.dtype() {
        DType::F32 => true,
        DType::BF16 => low,
        _ => false,
    };
    ok(x) && w.is_none_or(ok) && side.is_none_or(|(a, b, _)| ok(a) && ok(b))
}

/// The inputs of [`linear_lora_nf4`] it gives back: `x` and the side path.
pub type Nf4Inputs<B> = (Tensor<B, 2>, Option<Side<B>>);

/// [`linear_lora`] with an NF4 base weight (QLoRA) on `Autodiff<Flex>`: dequantized for the
/// forward product and again in the backward pass for `dX` (never kept dense between them, as
/// bitsandbytes' `MatMul4Bit`), and given no gradient. Other backends and dtypes get `x` and
/// the side path back as `Err`, for the composition.
pub fn linear_lora_nf4<B: Backend>(
    x: Tensor<B, 2>,
    q: &Nf4Weight<B>,
    side: Option<Side<B>>,
) -> Result<Tensor<B, 2>, Nf4Inputs<B>> {
    let any: &dyn std::any::Any = q;
    let Some(q) = any.downcast_ref::<Nf4Weight<Ad>>() else {
        return Err((x, side));
    };
    let low = x.dtype() == DType::BF16;
    // Mismatched widths go to the composition too, whose matmul says so.
    if !computes(low, &x, None, side.as_ref()) || x.dims()[1] != q.d_in {
        return Err((x, side));
    }
    let inner = q.valid();
    let w = Tensor::<Ad, 2>::from_inner(inner.dequantize());
    let [n, d_in] = x.dims();
    let d = Dims {
        n,
        d_in,
        d_out: inner.d_out,
        r: side.as_ref().map_or(0, |(a, _, _)| a.dims()[0]),
        low,
    };
    on_backend((x, side), move |(x, side): Nf4Inputs<Ad>| {
        tracked(d, x, w, side, Some(inner))
    })
}

/// What the state keeps of the base weight: the NF4 weight when there is one, else `w`.
fn weight(w: FlexTensor, nf4: Option<Nf4Weight<Flex>>) -> Weight {
    match nf4 {
        Some(q) => Weight::Nf4(Box::new(q)),
        None => Weight::Dense(w),
    }
}

/// The op on `Autodiff<Flex>`; `w` the dequantized `nf4` weight when given (then kept as the
/// NF4 weight for the backward pass, and its packed form not kept).
fn tracked(
    d: Dims,
    x: Tensor<Ad, 2>,
    w: Tensor<Ad, 2>,
    side: Option<Side<Ad>>,
    nf4: Option<Nf4Weight<Flex>>,
) -> Tensor<Ad, 2> {
    let out_dtype = x.dtype();
    let (xp, wp) = (primitive(x), primitive(w));
    let (xi, wi) = (xp.primitive.to_contiguous(), wp.primitive.to_contiguous());
    let owners = Owners::of(
        d.low,
        &xi,
        &wi,
        wp.node.requirement.is_none() && nf4.is_none(),
    );
    let (x, w) = (
        Src::kept(&xi, owners.x.as_ref()),
        Src::kept(&wi, owners.w.as_ref()),
    );
    match side {
        None => {
            let (y, _) = forward(d, x, w, None);
            let y = y.into_flex([d.n, d.d_out], out_dtype);
            let node = match LinearBackward
                .prepare::<NoCheckpointing>([xp.node, wp.node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let st = State {
                        d,
                        x: xi,
                        w: weight(wi, nf4),
                        lora: None,
                        owners,
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
            let s = scale(d.low, s);
            let lora = Some((Src::of(&ai), Src::of(&bi), s));
            let (y, xa) = forward(d, x, w, lora);
            let y = y.into_flex([d.n, d.d_out], out_dtype);
            let xa = xa.expect("a side path keeps x·Aᵀ");
            let node = match LinearBackward
                .prepare::<NoCheckpointing>([xp.node, wp.node, ap.node, bp.node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let st = State {
                        d,
                        x: xi,
                        w: weight(wi, nf4),
                        lora: Some((ai, bi, s, xa)),
                        owners,
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
    use crate::in_dtype;

    fn leaf(shape: [usize; 2], seed: u64) -> Tensor<Ad, 2> {
        <Ad as burn::tensor::backend::Backend>::seed(&Default::default(), seed);
        Tensor::<Ad, 2>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
            .require_grad()
    }

    /// An independent copy of `t` in `dtype`, a leaf that requires a gradient when `grad`.
    fn twin(t: &Tensor<Ad, 2>, dtype: DType, grad: bool) -> Tensor<Ad, 2> {
        let t = Tensor::<Ad, 2>::from_data(t.to_data(), &t.device()).cast(dtype);
        if grad {
            t.require_grad()
        } else {
            t
        }
    }

    /// Within rounding: 1e-5 relative (1e-4 absolute) in f32; in bf16, one rounding of the
    /// result (2⁻⁸ relative) twice over, since a different summation order can move a value to
    /// the neighbouring bf16.
    fn close(what: &str, a: Tensor<Flex, 2>, b: Tensor<Flex, 2>, dtype: DType) {
        assert_eq!(a.dtype(), dtype, "{what}: dtype");
        assert_eq!(b.dtype(), dtype, "{what}: the composition's dtype");
        let (a, b) = (
            a.cast(DType::F32).into_data(),
            b.cast(DType::F32).into_data(),
        );
        assert_eq!(a.shape, b.shape, "{what}: shapes");
        let tol = if dtype == DType::BF16 {
            Tolerance::rel_abs(8e-3, 1e-2)
        } else {
            // f32: the side path's sums (`lora_side`) run in another order than `gemm`'s; a
            // gradient like `dB`'s sums 37 terms some twenty times its value (2.7e-5 apart).
            Tolerance::rel_abs(1e-5, 1e-4)
        };
        a.assert_approx_eq::<f32>(&b, tol);
    }

    /// `Σ y·c` with a fixed non-uniform `c`, summed in f32.
    fn loss(y: Tensor<Ad, 2>) -> Tensor<Ad, 1> {
        // `c` from data, not the backend's global RNG, which tests running in parallel share.
        let [m, n] = y.dims();
        let c: Vec<f32> = (0..m * n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let c = Tensor::<Ad, 2>::from_data(burn::tensor::TensorData::new(c, [m, n]), &y.device());
        (y.cast(DType::F32) * c).sum()
    }

    /// The composition the op replaces, `x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ)` in `xd`, the weights cast as
    /// `Linear` casts them.
    fn composed(
        x: &Tensor<Ad, 2>,
        w: Tensor<Ad, 2>,
        side: Option<(&Tensor<Ad, 2>, &Tensor<Ad, 2>, f64)>,
        xd: DType,
    ) -> Tensor<Ad, 2> {
        let y = x.clone().matmul(in_dtype(w, xd).transpose());
        match side {
            None => y,
            Some((a, b, s)) => {
                let t = x
                    .clone()
                    .matmul(in_dtype(a.clone(), xd).transpose())
                    .matmul(in_dtype(b.clone(), xd).transpose());
                y + t.mul_scalar(s)
            }
        }
    }

    /// Fused vs composition, forward and every tracked gradient, with and without a side path
    /// and with a frozen or trainable base (`n` not a multiple of gemm's blocks). `low`: `x` in
    /// bf16 with f32 master weights, the composition casting them as `Linear` does.
    fn check(lora: bool, train_w: bool, low: bool) {
        // 2.5: `dY·s` computed; 2: `s` moved onto `B` and `x·Aᵀ` (`scale_moves`).
        for s in [2.5, 2.0] {
            check_scaled(lora, train_w, low, s);
        }
    }

    fn check_scaled(lora: bool, train_w: bool, low: bool, s: f64) {
        let (n, d_in, d_out, r) = (37, 24, 20, 4);
        let xd = if low { DType::BF16 } else { DType::F32 };
        let x = leaf([n, d_in], 1);
        let w = leaf([d_out, d_in], 2);
        let a = leaf([r, d_in], 3);
        let b = leaf([d_out, r], 4);
        let f32 = DType::F32;
        let (xf, wf, af, bf) = (
            twin(&x, xd, true),
            twin(&w, f32, train_w),
            twin(&a, f32, true),
            twin(&b, f32, true),
        );
        let (xc, wc, ac, bc) = (
            twin(&x, xd, true),
            twin(&w, f32, train_w),
            twin(&a, f32, true),
            twin(&b, f32, true),
        );
        let side = lora.then(|| (af.clone(), bf.clone(), s));
        let fused = linear_lora(xf.clone(), wf.clone(), side)
            .unwrap_or_else(|_| panic!("the fused path is taken on Autodiff<Flex>"));
        let plain = composed(&xc, wc.clone(), lora.then_some((&ac, &bc, s)), xd);
        close("y", fused.clone().inner(), plain.clone().inner(), xd);
        let (gf, gc) = (loss(fused).backward(), loss(plain).backward());
        let g = |t: &Tensor<Ad, 2>, g| t.grad(g).expect("a gradient");
        close("dx", g(&xf, &gf), g(&xc, &gc), xd);
        assert_eq!(
            wf.grad(&gf).is_some(),
            train_w,
            "dW only for a trainable base"
        );
        if train_w {
            close("dw", g(&wf, &gf), g(&wc, &gc), f32);
        }
        if lora {
            close("da", g(&af, &gf), g(&ac, &gc), f32);
            close("db", g(&bf, &gf), g(&bc, &gc), f32);
        }
    }

    #[test]
    fn fused_linear_matches_the_composition_and_its_gradients() {
        for low in [false, true] {
            check(true, false, low); // LoRA on a frozen base
            check(true, true, low); // LoRA and a trainable base
            check(false, true, low); // full fine-tuning
            check(false, false, low); // a frozen layer (x's gradient only)
        }
    }

    /// QLoRA: an NF4 base through the op against the composition on its dequantized weight,
    /// forward and the gradients of `x`, `A` and `B`, in f32 and bf16, with and without an
    /// adapter; the NF4 base gets no gradient.
    #[test]
    fn fused_qlora_matches_the_composition_and_its_gradients() {
        use super::linear_lora_nf4;
        use crate::nf4::{quantize_nf4, Nf4Options, Nf4Weight};
        let (n, d_in, d_out, r, s) = (37, 64, 20, 4, 2.0);
        let values: Vec<f32> = (0..d_out * d_in)
            .map(|i| (((i * 7919) % 2003) as f32 - 1001.0) / 900.0)
            .collect();
        let data = quantize_nf4(&values, &[d_out, d_in], Nf4Options::default());
        let q = Nf4Weight::<Ad>::from_data(&data, &Default::default());
        for (low, lora) in [(false, true), (true, true), (false, false), (true, false)] {
            let xd = if low { DType::BF16 } else { DType::F32 };
            let (x, a, b) = (leaf([n, d_in], 5), leaf([r, d_in], 6), leaf([d_out, r], 7));
            let f32 = DType::F32;
            let (xf, af, bf) = (twin(&x, xd, true), twin(&a, f32, true), twin(&b, f32, true));
            let (xc, ac, bc) = (twin(&x, xd, true), twin(&a, f32, true), twin(&b, f32, true));
            let side = lora.then(|| (af.clone(), bf.clone(), s));
            let fused = linear_lora_nf4(xf.clone(), &q, side)
                .unwrap_or_else(|_| panic!("the fused path is taken on Autodiff<Flex>"));
            let plain = composed(&xc, q.dequantize(), lora.then_some((&ac, &bc, s)), xd);
            close("y", fused.clone().inner(), plain.clone().inner(), xd);
            let (gf, gc) = (loss(fused).backward(), loss(plain).backward());
            let g = |t: &Tensor<Ad, 2>, g| t.grad(g).expect("a gradient");
            close("dx", g(&xf, &gf), g(&xc, &gc), xd);
            if lora {
                close("da", g(&af, &gf), g(&ac, &gc), f32);
                close("db", g(&bf, &gf), g(&bc, &gc), f32);
            }
        }
    }

    /// Moving a power-of-two scale off `dY` gives the same products to the bit: `(dY·s)·B` and
    /// `dY·(s·B)`, in f32 and with bf16 `dY` on the bf16 kernels.
    #[test]
    fn a_power_of_two_scale_moves_exactly() {
        use super::{prod, scale_moves, scaled_grad, xm, Src};
        use burn::tensor::bf16;
        let (n, d_out, r) = (70, 45, 16);
        let v = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 317.0)
                .collect()
        };
        let (g, b) = (v(n * d_out, 1), v(d_out * r, 2));
        let gb: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
        for (low, g) in [(false, Src::f32(&g)), (true, Src::bf16(&gb))] {
            for s in [1.0, 2.0, 8.0] {
                assert!(scale_moves(low, g, s));
                let gs = scaled_grad(low, g, s);
                let sb = scaled_grad(false, Src::f32(&b), s);
                let want = prod(low, gs.src(), Src::f32(&b), xm(n, d_out, r));
                let got = prod(low, g, sb.src(), xm(n, d_out, r));
                assert!(
                    want.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "low {low}, s {s}"
                );
            }
            assert!(!scale_moves(low, g, 2.5) && !scale_moves(low, g, 0.5));
        }
        // An f32 dY in bf16 would be rounded by the packing, not as `dY·s` rounds.
        assert!(!scale_moves(true, Src::f32(&g), 2.0));
    }

    #[test]
    fn fused_linear_in_pure_bf16() {
        // bf16 weights too (`param_dtype = "bf16"`): gradients come back in bf16.
        let bf = DType::BF16;
        let (x, w) = (
            twin(&leaf([9, 8], 1), bf, true),
            twin(&leaf([5, 8], 2), bf, true),
        );
        let (a, b) = (
            twin(&leaf([2, 8], 3), bf, true),
            twin(&leaf([5, 2], 4), bf, true),
        );
        let y = linear_lora(x.clone(), w.clone(), Some((a.clone(), b.clone(), 0.5)))
            .unwrap_or_else(|_| panic!("the fused path is taken for bf16"));
        let t = x
            .clone()
            .matmul(a.clone().transpose())
            .matmul(b.clone().transpose());
        let plain = x.clone().matmul(w.clone().transpose()) + t.mul_scalar(0.5);
        close("y", y.clone().inner(), plain.clone().inner(), bf);
        let (gf, gc) = (loss(y).backward(), loss(plain).backward());
        for (what, t) in [("dx", &x), ("dw", &w), ("da", &a), ("db", &b)] {
            // The composition's gradients accumulate into the same leaves: compare the two
            // backward passes' gradient tensors.
            close(
                what,
                t.grad(&gf).expect("fused"),
                t.grad(&gc).expect("plain"),
                bf,
            );
        }
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
        // bf16 inference on Flex.
        let bf = DType::BF16;
        let y = linear_lora(f(&x).cast(bf), f(&w), None)
            .unwrap_or_else(|_| panic!("the fused path is taken for bf16 on Flex"));
        let plain = f(&x).cast(bf).matmul(f(&w).cast(bf).transpose());
        close("bf16 y", y, plain, bf);
        // An f32 input with a bf16 weight, and f16, keep the composition.
        assert!(linear_lora(x.clone(), w.clone().cast(bf), None).is_err());
        let half = DType::F16;
        assert!(linear_lora(x.cast(half), w.cast(half), None).is_err());
    }
}
