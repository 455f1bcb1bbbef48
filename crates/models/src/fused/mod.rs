//! Fused training ops with hand-written backward passes (issue 11).
//!
//! Each op replaces a chain of burn autodiff nodes with one node whose backward is written out,
//! which cuts the per-node bookkeeping, the allocations and the single-threaded element-wise
//! passes of the generic backward: RMSNorm (8 nodes), SwiGLU (3), softmax (4), attention with
//! its rotary embedding (about 25, [`attention`]) and the causal-LM cross-entropy (about 10,
//! [`cross_entropy`]). The linear layers' fused op lives in `bellows_peft::fused`, whose
//! run-time dispatch ([`on_backend`]) these use: the fused path on `Autodiff<Flex>` (attention
//! and cross-entropy also on `Flex`, for evaluation), the plain burn composition on every other
//! backend, which computes the same numbers to rounding.

use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

pub(crate) use bellows_peft::fused::{
    f32_slice, f32_values, flex_tensor, flex_tensor_in, on_backend, primitive, Ad,
};

pub(crate) mod attention;
mod attention_kernel;
pub(crate) mod cross_entropy;
mod elem;
pub(crate) mod rms_norm;
mod rms_norm_kernel;
pub(crate) mod softmax;
pub(crate) mod swiglu;

/// The inner-backend tensor of a primitive.
pub(crate) fn inner<I: Backend, const D: usize>(p: I::FloatTensorPrimitive) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The primitive of an inner-backend tensor.
pub(crate) fn prim<I: Backend, const D: usize>(t: Tensor<I, D>) -> I::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for comparing a fused op with its plain composition.

    use burn::tensor::{DType, Distribution, Tensor};

    use super::Ad;

    /// A leaf tensor of `N(0, 1)` values in `dtype` that requires a gradient.
    pub(crate) fn leaf<const D: usize>(
        shape: [usize; D],
        dtype: DType,
        seed: u64,
    ) -> Tensor<Ad, D> {
        <Ad as burn::tensor::backend::Backend>::seed(&Default::default(), seed);
        Tensor::<Ad, D>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
            .cast(dtype)
            .detach()
            .require_grad()
    }

    /// An independent leaf with the same values as `t`.
    /// (`from_data` converts to the default float type, so the dtype is restored by a cast.)
    pub(crate) fn twin<const D: usize>(t: &Tensor<Ad, D>) -> Tensor<Ad, D> {
        Tensor::<Ad, D>::from_data(t.to_data(), &t.device())
            .cast(t.dtype())
            .detach()
            .require_grad()
    }

    /// `Σ y·c` for a fixed non-uniform `c`, so that `dy = c` is not uniform. `c` is built from
    /// data, not drawn: the backend's seeded RNG is global, and another test running in
    /// parallel could draw between a reseed and the draw, handing the fused op and its
    /// composition different upstream gradients.
    pub(crate) fn loss<const D: usize>(y: Tensor<Ad, D>) -> Tensor<Ad, 1> {
        let c = fixed(y.dims());
        (y.cast(DType::F32) * c).sum()
    }

    /// Deterministic values in [−2, 2) of `shape`, independent of any RNG.
    pub(crate) fn fixed<const D: usize>(shape: [usize; D]) -> Tensor<Ad, D> {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        Tensor::<Ad, D>::from_data(burn::tensor::TensorData::new(v, shape), &Default::default())
    }

    /// Panics unless `a` and `b` have the same shape, and `|a − b| ≤ atol + rtol·|b|` everywhere.
    pub(crate) fn assert_close<B: burn::tensor::backend::Backend, const D: usize>(
        what: &str,
        a: Tensor<B, D>,
        b: Tensor<B, D>,
        atol: f32,
        rtol: f32,
    ) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        assert_eq!(a.dtype(), b.dtype(), "{what}: dtypes");
        let a = a
            .cast(DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("f32 data");
        let b = b
            .cast(DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("f32 data");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= atol + rtol * y.abs(),
                "{what}: element {i}: fused {x} vs plain {y}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::Tensor;

    use super::{on_backend, Ad};

    #[test]
    fn the_fused_path_is_taken_on_backend_only() {
        let ad = Tensor::<Ad, 1>::zeros([2], &Default::default());
        let r: Result<Tensor<Ad, 1>, _> = on_backend(ad, |x: Tensor<Ad, 1>| x);
        assert!(r.is_ok());
        let plain = Tensor::<Flex, 1>::zeros([2], &Default::default());
        let r: Result<Tensor<Flex, 1>, _> = on_backend(plain, |x: Tensor<Ad, 1>| x);
        assert!(r.is_err());
    }
}
