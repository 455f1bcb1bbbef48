//! A plain matrix product for the ops that multiply tensors they already hold (the sharded
//! linear layer's gathered weight, the NF4 layer's dequantized one): bf16 on Flex goes through
//! the bf16 kernel — the same kernel and rounding as the fused linear op, so a layer computes
//! the same bits whether its weight is whole, sharded or quantized — and everything else
//! through burn's `matmul`.

use std::any::TypeId;

use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Tensor, TensorPrimitive};

use super::bf16_gemm::product_bf16;
use super::{flex_tensor_in, on_backend, primitive};

type Pair<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// `op(l) · op(r)`, `op` transposing where `lt` / `rt` say. For bf16 `l`, `r` on `Flex` (not
/// autodiff): products of the bf16 values summed in f32, rounded to bf16 (as Flex's own bf16
/// matmul rounds), on the bf16 kernel; elsewhere burn's `matmul` of the (transposed) operands.
pub fn matmul<B: Backend>(l: Tensor<B, 2>, lt: bool, r: Tensor<B, 2>, rt: bool) -> Tensor<B, 2> {
    matmul_bf16(l, lt, r, rt).unwrap_or_else(|(l, r)| {
        let l = if lt { l.transpose() } else { l };
        let r = if rt { r.transpose() } else { r };
        l.matmul(r)
    })
}

/// [`matmul`]'s bf16 kernel path; other backends and dtypes get the operands back as `Err`.
fn matmul_bf16<B: Backend>(
    l: Tensor<B, 2>,
    lt: bool,
    r: Tensor<B, 2>,
    rt: bool,
) -> Result<Tensor<B, 2>, Pair<B>> {
    if TypeId::of::<B>() != TypeId::of::<Flex>()
        || l.dtype() != DType::BF16
        || r.dtype() != DType::BF16
    {
        return Err((l, r));
    }
    on_backend((l, r), move |(l, r): Pair<Flex>| {
        let ([a0, a1], [b0, b1]) = (l.dims(), r.dims());
        let (l, r) = (primitive(l).to_contiguous(), primitive(r).to_contiguous());
        let (ls, rs): (&[burn::tensor::bf16], &[burn::tensor::bf16]) = (
            l.as_slice().expect("contiguous bf16"),
            r.as_slice().expect("contiguous bf16"),
        );
        // A row-major [a0, a1] read as its transpose has strides (1, a1).
        let (m, k, lstr) = if lt {
            (a1, a0, (1, a1))
        } else {
            (a0, a1, (a1, 1))
        };
        let (n, rstr) = if rt { (b0, (1, b1)) } else { (b1, (b1, 1)) };
        let y = product_bf16(ls, lstr, rs, rstr, (m, k, n));
        let y = flex_tensor_in(y, [m, n], DType::BF16);
        Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(y))
    })
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution, Tensor, Tolerance};

    use super::matmul_bf16;

    #[test]
    fn bf16_products_in_every_orientation_match_flexs_matmul() {
        let dev = Default::default();
        let t = |s: [usize; 2]| {
            Tensor::<Flex, 2>::random(s, Distribution::Normal(0.0, 1.0), &dev).cast(DType::BF16)
        };
        let (a, b) = (t([7, 5]), t([5, 9]));
        let want = a.clone().matmul(b.clone());
        for (lt, rt) in [(false, false), (true, false), (false, true), (true, true)] {
            // Each operand handed over as stored: transposed where the flag says so.
            let l = if lt { a.clone().transpose() } else { a.clone() };
            let r = if rt { b.clone().transpose() } else { b.clone() };
            let got = matmul_bf16(l, lt, r, rt).unwrap_or_else(|_| panic!("bf16 on Flex"));
            assert_eq!(got.dtype(), DType::BF16);
            got.cast(DType::F32).into_data().assert_approx_eq::<f32>(
                &want.clone().cast(DType::F32).into_data(),
                Tolerance::rel_abs(8e-3, 1e-2),
            );
        }
        assert!(matmul_bf16(
            a.clone().cast(DType::F32),
            false,
            b.clone().cast(DType::F32),
            false
        )
        .is_err());
        // f32 takes burn's product, transposes included.
        let (af, bf) = (a.cast(DType::F32), b.cast(DType::F32));
        let got = super::matmul(af.clone().transpose(), true, bf.clone(), false);
        got.into_data()
            .assert_approx_eq::<f32>(&af.matmul(bf).into_data(), Tolerance::rel_abs(1e-6, 1e-6));
    }
}

#[cfg(test)]
mod same_bits {
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution, Tensor};

    #[test]
    fn whole_and_sharded_products_are_the_same_bits() {
        let dev = Default::default();
        let x = Tensor::<Flex, 2>::random([37, 300], Distribution::Normal(0.0, 1.0), &dev)
            .cast(DType::BF16);
        let w = Tensor::<Flex, 2>::random([29, 300], Distribution::Normal(0.0, 0.05), &dev);
        let fused = super::super::linear_lora(x.clone(), w.clone(), None)
            .unwrap_or_else(|_| panic!("fused"));
        let wb = crate::in_dtype(w, DType::BF16);
        let plain = super::matmul_bf16(x, false, wb, true).unwrap_or_else(|_| panic!("plain"));
        let (a, b) = (
            fused
                .into_data()
                .to_vec::<burn::tensor::bf16>()
                .expect("bf16"),
            plain
                .into_data()
                .to_vec::<burn::tensor::bf16>()
                .expect("bf16"),
        );
        let diff = a
            .iter()
            .zip(&b)
            .filter(|(p, q)| p.to_bits() != q.to_bits())
            .count();
        assert_eq!(diff, 0, "{diff} of {} differ", a.len());
    }
}
