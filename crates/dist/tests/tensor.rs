//! The host-staged burn helpers across ranks.

mod common;

use bellows_dist::{all_reduce_tensor, broadcast_tensor, run_local, DistConfig, ReduceOp};
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use common::with_timeout;

#[test]
fn all_reduce_and_broadcast_tensors_keep_shape_and_dtype() {
    with_timeout(120, || {
        let out = run_local(2, &DistConfig::default(), |pg| {
            let dev = Default::default();
            let r = pg.rank() as f32;
            let t = Tensor::<Flex, 2>::from_data(
                TensorData::new(vec![r, r + 1.0, r + 2.0, 10.0 * r], [2, 2]),
                &dev,
            );
            let mean = all_reduce_tensor(&pg, t, ReduceOp::Mean).expect("all_reduce_tensor");
            assert_eq!(mean.dims(), [2, 2]);
            let half = Tensor::<Flex, 1>::from_data(
                TensorData::new(vec![r + 0.5; 3], [3]),
                (&dev, DType::BF16),
            );
            let summed = all_reduce_tensor(&pg, half, ReduceOp::Sum).expect("bf16 all_reduce");
            assert_eq!(summed.dtype(), DType::BF16);
            let wide = Tensor::<Flex, 1>::from_data(
                TensorData::new(vec![r as f64 + 0.25], [1]),
                (&dev, DType::F64),
            );
            let wide = broadcast_tensor(&pg, wide, 1).expect("broadcast_tensor");
            (
                mean.into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("f32"),
                summed
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("bf16 as f32"),
                wide.into_data().to_vec::<f64>().expect("f64"),
            )
        })
        .expect("harness");
        for (mean, summed, wide) in out {
            assert_eq!(mean, [0.5, 1.5, 2.5, 5.0]);
            assert_eq!(summed, [2.0; 3]);
            assert_eq!(wide, [1.25]);
        }
    });
}
