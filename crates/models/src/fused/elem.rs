//! The element types the fused ops compute on — f32, and bf16 (mixed precision) widened to f32
//! on the fly — so that one generic pass serves both.

use bellows_peft::fused::bits::{round_bits, widen};
use bellows_peft::fused::simd;
use burn::tensor::{bf16, Element, Shape, TensorData};
use burn_flex::FlexTensor;

use super::f32_slice;

/// An f32 or bf16 element.
pub(crate) trait Elem: Copy + Send + Sync + Default + Element {
    /// Whether this dtype's passes may reorder a sum into lanes (bf16, whose rounding hides
    /// the reordering; f32 keeps the composition's order).
    const LANES: bool;
    /// The elements of a contiguous Flex tensor of this dtype.
    fn slice(t: &FlexTensor) -> &[Self];
    /// The value as f32 (exact).
    fn wide(self) -> f32;
    /// An f32 result in this dtype (bf16: nearest even, as Flex's bf16 ops round results).
    fn narrow(x: f32) -> Self;
    /// `eˣ` as this dtype's passes compute it: libm's in f32 (the composition's, bit for bit);
    /// in bf16 the vectorisable [`simd::exp`], whose few-ulp difference the rounding hides.
    fn exp(x: f32) -> f32;
    /// `σ(x)`: in f32 Flex's own `sigmoid` (the composition's, bit for bit); in bf16
    /// `1 / (1 + e⁻ˣ)` on [`Self::exp`], without branches.
    fn sigmoid(x: f32) -> f32;
}

impl Elem for f32 {
    const LANES: bool = false;
    fn slice(t: &FlexTensor) -> &[Self] {
        f32_slice(t)
    }
    fn wide(self) -> f32 {
        self
    }
    fn narrow(x: f32) -> Self {
        x
    }
    fn exp(x: f32) -> f32 {
        x.exp()
    }
    /// Flex's `sigmoid` (`burn_flex::ops::activation`).
    fn sigmoid(x: f32) -> f32 {
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let e = x.exp();
            e / (1.0 + e)
        }
    }
}

impl Elem for bf16 {
    const LANES: bool = true;
    fn slice(t: &FlexTensor) -> &[Self] {
        t.as_slice().expect("the fused ops' tensors are contiguous")
    }
    fn wide(self) -> f32 {
        widen(self.to_bits())
    }
    fn narrow(x: f32) -> Self {
        bf16::from_bits(round_bits(x))
    }
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        simd::exp(x)
    }
    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + simd::exp(-x))
    }
}

/// A Flex tensor owning `v`, row-major in `shape`.
pub(crate) fn tensor<E: Elem>(v: Vec<E>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape.into()))
}
