//! f32 ↔ bf16 casts as one parallel pass. Flex's own `cast` converts through a vector of f64 on
//! one core (12 bytes of traffic per element plus an allocation of twice the f32 size); mixed
//! precision casts the residual stream, every norm's output and the logits each step, both ways.
//! The values are Flex's, bit for bit ([`super::cast_bits`]); widening back is exact.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

use super::bits::cast_to_bf16;
use super::{f32_slice, f32_values, flex_tensor, on_backend, primitive, Ad};

/// `t` (contiguous f32 or bf16) converted to `to`.
fn convert(t: &FlexTensor, to: DType) -> FlexTensor {
    let t = t.to_contiguous();
    let shape = t.layout().shape().clone();
    if to == DType::BF16 {
        let v = cast_to_bf16(f32_slice(&t));
        FlexTensor::from_data(TensorData::new(v, shape))
    } else {
        flex_tensor(f32_values(&t).into_owned(), shape)
    }
}

/// The gradient goes back to the source dtype.
#[derive(Debug)]
struct CastBackward;

impl Backward<Flex, 1> for CastBackward {
    type State = DType;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(p) = parent {
            grads.register::<Flex>(p.id, convert(&grad, ops.state));
        }
    }
}

/// `t` cast to `to` in one parallel pass, with a backward pass that casts the gradient back,
/// on `Autodiff<Flex>` and `Flex` for f32 ↔ bf16; other backends and dtypes get `t` back as
/// `Err` (for burn's `cast`).
pub fn cast<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    to: DType,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let ty = TypeId::of::<B>();
    let from = t.dtype();
    let pair = matches!(
        (from, to),
        (DType::F32, DType::BF16) | (DType::BF16, DType::F32)
    );
    if !pair || (ty != TypeId::of::<Ad>() && ty != TypeId::of::<Flex>()) {
        return Err(t);
    }
    if ty == TypeId::of::<Ad>() {
        on_backend(t, move |t: Tensor<Ad, D>| {
            let p = primitive(t);
            let y = convert(&p.primitive, to);
            let node = match CastBackward
                .prepare::<NoCheckpointing>([p.node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(from, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(node))
        })
    } else {
        on_backend(t, move |t: Tensor<Flex, D>| {
            let y = convert(&primitive(t), to);
            Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(y))
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution, Tensor, TensorData};

    use super::{cast, Ad};

    /// Values around every bf16 rounding case: random magnitudes, ties, specials.
    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..1u32 << 16)
            .map(|i| f32::from_bits(0x3f80_0000 | i))
            .collect();
        v.extend((0..1u32 << 16).map(|i| f32::from_bits(0xc2a0_0000 ^ (i * 40503))));
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
        ]);
        v
    }

    fn bits(t: Tensor<Flex, 1>) -> Vec<u16> {
        t.into_data()
            .to_vec::<burn::tensor::bf16>()
            .expect("bf16")
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn casts_give_flexs_values() {
        let v = values();
        let x = Tensor::<Flex, 1>::from_data(
            TensorData::new(v.clone(), [v.len()]),
            &Default::default(),
        );
        let fast = cast(x.clone(), DType::BF16).unwrap_or_else(|_| panic!("f32 → bf16 on Flex"));
        assert_eq!(fast.dtype(), DType::BF16);
        let slow = x.cast(DType::BF16);
        let (f, w) = (bits(fast.clone()), bits(slow.clone()));
        if let Some(i) = (0..v.len()).find(|&i| f[i] != w[i]) {
            panic!(
                "f32 → bf16 of {:e} ({:#x}): {:#x}, Flex {:#x}",
                v[i],
                v[i].to_bits(),
                f[i],
                w[i]
            );
        }
        let back = cast(fast, DType::F32).unwrap_or_else(|_| panic!("bf16 → f32 on Flex"));
        let back = back.into_data().to_vec::<f32>().expect("f32");
        let want = slow
            .cast(DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        if let Some(i) = (0..v.len()).find(|&i| back[i].to_bits() != want[i].to_bits()) {
            panic!(
                "bf16 → f32 of {:e}: {:e}, Flex {:e}",
                v[i], back[i], want[i]
            );
        }
        let same = Tensor::<Flex, 1>::zeros([2], &Default::default());
        assert!(cast(same, DType::F32).is_err(), "no-op casts are burn's");
    }

    #[test]
    fn the_gradient_is_cast_back() {
        let dev = Default::default();
        let x =
            Tensor::<Ad, 2>::random([5, 7], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let c = Tensor::<Ad, 2>::random([5, 7], Distribution::Normal(0.0, 1.0), &dev);
        let y = cast(x.clone(), DType::BF16).unwrap_or_else(|_| panic!("on Autodiff<Flex>"));
        let g = (y.cast(DType::F32) * c.clone()).sum().backward();
        let gx = x.grad(&g).expect("x's gradient");
        assert_eq!(gx.dtype(), DType::F32);
        // d/dx Σ c·bf16(x) = bf16(c), widened (the cast's gradient rounds like the forward).
        let want = c.inner().cast(DType::BF16).cast(DType::F32);
        assert_eq!(
            gx.into_data().to_vec::<f32>().expect("f32"),
            want.into_data().to_vec::<f32>().expect("f32")
        );
    }
}
