//! [`Nf4Weight::dequantize`] on the CPU backend in one parallel pass over the packed codes.
//!
//! The burn-op path (nibble split, stack, cast, code-book `select`, scale broadcast, pad and
//! narrow) is about ten single-threaded passes over the weight on Flex, each a new tensor; a
//! QLoRA step dequantizes every base weight twice (forward, and again in the backward pass), so
//! those passes were most of the step. Here each element is `quant_map[code] · absmax[block]`
//! computed once, on rayon's pool ([`super::data`]'s `dequantize_packed`, which
//! [`super::Nf4Data::dequantize`] runs too) — the same two operations in f32 as the burn ops,
//! so the same bits (tested against the burn-op path).

use std::any::Any;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::{backend::Backend, Int, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use super::data::{dequantize_packed, double_quant_scales};
use super::weight::Nf4Weight;
use crate::fused::flex_tensor;

/// The float primitive of a Flex tensor (`None` for a quantized one).
fn float(t: &Tensor<Flex, 1>) -> Option<FlexTensor> {
    match t.clone().into_primitive() {
        TensorPrimitive::Float(p) => Some(p),
        TensorPrimitive::QFloat(_) => None,
    }
}

/// The int primitive of a Flex tensor.
fn int(t: &Tensor<Flex, 1, Int>) -> FlexTensor {
    t.clone().into_primitive()
}

/// The dequantized weight of an Nf4Weight on Flex, `None` where a part is not a contiguous
/// tensor of the expected type (the caller then takes the burn-op path).
fn on_flex(w: &Nf4Weight<Flex>) -> Option<Tensor<Flex, 2>> {
    let (packed, qm) = (int(&w.packed), float(&w.quant_map)?);
    let absmax: Vec<f32> = match (&w.absmax, &w.absmax_codes, &w.nested_absmax, &w.code_map) {
        (Some(a), ..) => float(a)?.as_slice::<f32>()?.to_vec(),
        (None, Some(codes), Some(nested), Some(map)) => {
            let (codes, nested, map) = (int(codes), float(nested)?, float(map)?);
            let (codes, nested, map) = (
                codes.as_slice::<u8>()?,
                nested.as_slice::<f32>()?,
                map.as_slice::<f32>()?,
            );
            let nb = w.nested_block_size;
            if nb == 0 || nested.len() < codes.len().div_ceil(nb) || map.len() < 256 {
                return None;
            }
            // As the burn-op path: `map[code] · nested` rounded, then `+ offset` rounded.
            double_quant_scales(codes, nested, map, w.offset, nb)
        }
        _ => return None,
    };
    let n = w.d_out * w.d_in;
    let values = dequantize_packed(
        packed.as_slice::<u8>()?,
        qm.as_slice::<f32>()?,
        &absmax,
        w.block_size,
        n,
    );
    let t = flex_tensor(values, [w.d_out, w.d_in]);
    Some(Tensor::from_primitive(TensorPrimitive::Float(t)))
}

/// [`on_flex`] for an Nf4Weight on `Flex` or `Autodiff<Flex>` (the result outside any graph, as
/// the burn-op path's); `None` on other backends.
pub(crate) fn try_dequantize<B: Backend>(w: &Nf4Weight<B>) -> Option<Tensor<B, 2>> {
    let any: &dyn Any = w;
    let t: Box<dyn Any> = if let Some(w) = any.downcast_ref::<Nf4Weight<Flex>>() {
        Box::new(on_flex(w)?)
    } else if let Some(w) = any.downcast_ref::<Nf4Weight<Autodiff<Flex>>>() {
        Box::new(Tensor::<Autodiff<Flex>, 2>::from_inner(on_flex(
            &w.valid(),
        )?))
    } else {
        return None;
    };
    Some(
        *t.downcast::<Tensor<B, 2>>()
            .expect("the dequantized weight lives on the weight's backend"),
    )
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Tensor;

    use super::super::{quantize_nf4, Nf4Options, Nf4Weight};

    fn bits<B: burn::tensor::backend::Backend>(t: Tensor<B, 2>) -> Vec<u32> {
        let v = t.into_data().to_vec::<f32>().expect("f32");
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Plain and double-quantized scales, an odd element count (a last half byte), a partial
    /// last block, more than one parallel task: the one-pass kernel gives the burn-op path's
    /// bits and the host reference's, on Flex and under autodiff.
    #[test]
    fn host_dequantization_equals_the_burn_op_path_to_the_bit() {
        let dev = Default::default();
        for (shape, block_size, double_quant) in [
            ([37usize, 45usize], 64, true),
            ([37, 45], 64, false),
            ([300, 257], 64, true),
            ([9, 7], 16, false),
        ] {
            let n = shape[0] * shape[1];
            let values: Vec<f32> = (0..n)
                .map(|i| (((i * 7919) % 2003) as f32 - 1001.0) / 700.0)
                .collect();
            let opts = Nf4Options {
                block_size,
                double_quant,
            };
            let data = quantize_nf4(&values, &shape, opts);
            let w = Nf4Weight::<Flex>::from_data(&data, &dev);
            let fast = bits(w.dequantize());
            assert_eq!(
                fast,
                bits(w.dequantize_ops()),
                "{shape:?} {opts:?}: burn ops"
            );
            let host: Vec<u32> = data.dequantize().iter().map(|x| x.to_bits()).collect();
            assert_eq!(fast, host, "{shape:?} {opts:?}: Nf4Data::dequantize");
            let wa = Nf4Weight::<Autodiff<Flex>>::from_data(&data, &dev);
            assert_eq!(bits(wa.dequantize()), fast, "{shape:?} {opts:?}: autodiff");
            assert!(super::try_dequantize(&w).is_some(), "the fast path ran");
        }
    }
}
