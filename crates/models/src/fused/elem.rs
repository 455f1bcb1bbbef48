//! The element types the fused ops compute on — f32, and bf16 (mixed precision) widened to f32
//! on the fly — so that one generic pass serves both.

use bellows_peft::fused::bits::{round_bits, widen};
use burn::tensor::{bf16, Element, Shape, TensorData};
use burn_flex::FlexTensor;

use super::f32_slice;

/// An f32 or bf16 element.
pub(crate) trait Elem: Copy + Send + Sync + Default + Element {
    /// The elements of a contiguous Flex tensor of this dtype.
    fn slice(t: &FlexTensor) -> &[Self];
    /// The value as f32 (exact).
    fn wide(self) -> f32;
    /// An f32 result in this dtype (bf16: nearest even, as Flex's bf16 ops round results).
    fn narrow(x: f32) -> Self;
}

impl Elem for f32 {
    fn slice(t: &FlexTensor) -> &[Self] {
        f32_slice(t)
    }
    fn wide(self) -> f32 {
        self
    }
    fn narrow(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    fn slice(t: &FlexTensor) -> &[Self] {
        t.as_slice().expect("the fused ops' tensors are contiguous")
    }
    fn wide(self) -> f32 {
        widen(self.to_bits())
    }
    fn narrow(x: f32) -> Self {
        bf16::from_bits(round_bits(x))
    }
}

/// A Flex tensor owning `v`, row-major in `shape`.
pub(crate) fn tensor<E: Elem>(v: Vec<E>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape.into()))
}
