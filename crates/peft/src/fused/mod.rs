//! Fused CPU training ops on `Autodiff<Flex>` (issue 11), and the run-time dispatch that picks
//! them: a generic op runs the fused path only when its backend *is* `Autodiff<Flex>` (or `Flex`
//! for inference), and the plain burn composition everywhere else. `bellows_models::fused` builds
//! its own ops on [`on_backend`].

use std::any::Any;
use std::borrow::Cow;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{backend::Backend, bf16, DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

mod amx;
mod bf16_gemm;
pub mod bits;
mod cast;
mod epilogue;
mod gemm;
mod linear;
mod lora_side;
mod matmul;
mod pack_cache;
pub mod product_stats;
pub mod simd;

pub use bf16_gemm::{product_bf16, product_bf16_rounded, Bf16Operand};
pub use cast::cast;
pub use gemm::{matmul_strided, product};
pub use linear::{linear_lora, linear_lora_nf4};
pub use matmul::matmul;
pub use pack_cache::Owner;

/// The training backend the fused ops are written for.
pub type Ad = Autodiff<Flex>;

/// Runs `f` on `input` when `In` is `Want` (the same value seen as the concrete backend's type)
/// and returns its result as `Out`; gives `input` back otherwise.
///
/// # Panics
/// If `f`'s result is not an `Out` (a caller's type mistake, not a run-time condition).
pub fn on_backend<In: 'static, Out: 'static, Want: 'static, Got: 'static>(
    input: In,
    f: impl FnOnce(Want) -> Got,
) -> Result<Out, In> {
    let boxed: Box<dyn Any> = Box::new(input);
    match boxed.downcast::<Want>() {
        Ok(x) => {
            let y: Box<dyn Any> = Box::new(f(*x));
            Ok(*y
                .downcast::<Out>()
                .expect("the fused op's output has the caller's tensor type"))
        }
        Err(b) => Err(*b
            .downcast::<In>()
            .expect("a failed downcast returns the input")),
    }
}

/// The float primitive of a tensor.
///
/// # Panics
/// On a quantized tensor (the fused ops take dense float tensors).
pub fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => p,
        TensorPrimitive::QFloat(_) => panic!("the fused ops take dense float tensors"),
    }
}

/// The f32 elements of a contiguous Flex tensor (the fused ops make theirs contiguous first).
///
/// # Panics
/// If `t` is not contiguous f32.
pub fn f32_slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("the fused ops' tensors are contiguous f32")
}

/// A Flex tensor owning `values` (no copy), row-major in `shape`.
pub fn flex_tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

/// The values of a contiguous f32 or bf16 Flex tensor as f32 (borrowed when already f32;
/// bf16 widened exactly, in parallel).
///
/// # Panics
/// If `t` is not contiguous f32 or bf16.
pub fn f32_values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.dtype() {
        DType::BF16 => {
            let v: &[bf16] = t.as_slice().expect("the fused ops' tensors are contiguous");
            Cow::Owned(bits::to_f32(v))
        }
        _ => Cow::Borrowed(f32_slice(t)),
    }
}

/// A Flex tensor of `values` in `dtype`: f32 (owning `values`), or bf16 (each value rounded to
/// nearest even, as Flex's bf16 ops round their results: [`bits::round_bits`]).
pub fn flex_tensor_in(values: Vec<f32>, shape: impl Into<Shape>, dtype: DType) -> FlexTensor {
    if dtype == DType::BF16 {
        FlexTensor::from_data(TensorData::new(bits::to_bf16(&values), shape.into()))
    } else {
        flex_tensor(values, shape)
    }
}
