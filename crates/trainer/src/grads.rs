//! Whole-model gradient operations burn does not provide: the global L2 norm and clipping
//! (PyTorch's `clip_grad_norm_`), scaling, and host-staged all-reduce in buckets for DDP.

use std::collections::HashSet;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{backend::AutodiffBackend, Tensor, TensorData};

use bellows_dist::{ProcessGroup, ReduceOp};

/// Σ g² over every gradient in `grads` that belongs to `model`, accumulated in f64.
pub fn norm_sq<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> f64 {
    struct V<'a> {
        grads: &'a GradientsParams,
        sum: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
                // Low-precision gradients (pure bf16) are squared and summed in f32.
                let g = bellows_peft::in_dtype(g, burn::tensor::DType::F32);
                let v = g.powi_scalar(2).sum().into_scalar();
                self.sum += burn::tensor::ElementConversion::elem::<f64>(v);
            }
        }
    }
    let mut v = V { grads, sum: 0.0 };
    model.visit(&mut v);
    v.sum
}

/// Multiplies every gradient of `model` in `grads` by `factor`.
pub fn scale<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    factor: f64,
) -> GradientsParams {
    struct V {
        grads: GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(p.id) {
                self.grads
                    .register::<B::InnerBackend, D>(p.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut v = V { grads, factor };
    model.visit(&mut v);
    v.grads
}

/// Sums `grads` across the process group in buckets of about `bucket_bytes`, in module order.
///
/// # Errors
/// A collective fails (names the op and rank).
pub fn all_reduce_sum<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    pg: &ProcessGroup,
    bucket_bytes: usize,
) -> Result<GradientsParams, bellows_dist::Error> {
    if pg.world_size() == 1 {
        return Ok(grads);
    }
    struct Take {
        grads: GradientsParams,
        items: Vec<(ParamId, Vec<usize>, Vec<f32>)>,
        dtypes: std::collections::HashMap<ParamId, burn::tensor::DType>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Take {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(p.id) {
                let shape = g.dims().to_vec();
                self.dtypes.insert(p.id, g.dtype());
                let data = g.into_data().convert::<f32>();
                let values = data.to_vec::<f32>().unwrap_or_default();
                self.items.push((p.id, shape, values));
            }
        }
    }
    let mut take = Take {
        grads,
        items: Vec::new(),
        dtypes: std::collections::HashMap::new(),
    };
    model.visit(&mut take);
    let limit = (bucket_bytes / 4).max(1);
    let mut start = 0;
    while start < take.items.len() {
        let mut end = start;
        let mut n = 0;
        while end < take.items.len() && (n == 0 || n + take.items[end].2.len() <= limit) {
            n += take.items[end].2.len();
            end += 1;
        }
        let mut buf: Vec<f32> = Vec::with_capacity(n);
        for it in &take.items[start..end] {
            buf.extend_from_slice(&it.2);
        }
        pg.all_reduce(&mut buf, ReduceOp::Sum)?;
        let mut at = 0;
        for it in &mut take.items[start..end] {
            let len = it.2.len();
            it.2.copy_from_slice(&buf[at..at + len]);
            at += len;
        }
        start = end;
    }
    struct Put {
        grads: GradientsParams,
        items: std::collections::HashMap<ParamId, (Vec<usize>, Vec<f32>)>,
        dtypes: std::collections::HashMap<ParamId, burn::tensor::DType>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Put {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some((shape, values)) = self.items.remove(&p.id) {
                let device = p.val().device();
                // Back in the gradient's own dtype (bf16 for pure-bf16 parameters).
                let dtype = self
                    .dtypes
                    .get(&p.id)
                    .copied()
                    .unwrap_or(burn::tensor::DType::F32);
                let t = Tensor::<B::InnerBackend, D>::from_data(
                    TensorData::new(values, shape),
                    (&device, dtype),
                );
                self.grads.register::<B::InnerBackend, D>(p.id, t);
            }
        }
    }
    let items = take
        .items
        .into_iter()
        .map(|(id, s, v)| (id, (s, v)))
        .collect();
    let mut put = Put {
        grads: take.grads,
        items,
        dtypes: take.dtypes,
    };
    model.visit(&mut put);
    Ok(put.grads)
}

/// Replaces every trainable parameter of `model` with rank `root`'s values (initial DDP sync).
///
/// # Errors
/// A collective fails.
pub fn broadcast_params<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: M,
    pg: &ProcessGroup,
    root: usize,
) -> Result<M, bellows_dist::Error> {
    broadcast_params_except(model, pg, root, &HashSet::new())
}

/// [`broadcast_params`] leaving the parameters in `skip` alone (FSDP's sharded weights, which
/// differ by rank by design).
///
/// # Errors
/// A collective fails.
pub fn broadcast_params_except<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: M,
    pg: &ProcessGroup,
    root: usize,
    skip: &HashSet<ParamId>,
) -> Result<M, bellows_dist::Error> {
    if pg.world_size() == 1 {
        return Ok(model);
    }
    struct Map<'a> {
        pg: &'a ProcessGroup,
        root: usize,
        skip: &'a HashSet<ParamId>,
        err: Option<bellows_dist::Error>,
    }
    impl<B: AutodiffBackend> burn::module::ModuleMapper<B> for Map<'_> {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if self.err.is_some() || !p.is_require_grad() || self.skip.contains(&p.id) {
                return p;
            }
            let id = p.id;
            let t = p.val();
            let device = t.device();
            let dtype = t.dtype();
            let shape = t.dims().to_vec();
            let mut values = t
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default();
            if let Err(e) = self.pg.broadcast(&mut values, self.root) {
                self.err = Some(e);
            }
            let t = Tensor::<B, D>::from_data(TensorData::new(values, shape), (&device, dtype))
                .require_grad();
            Param::initialized(id, t)
        }
    }
    let mut m = Map {
        pg,
        root,
        skip,
        err: None,
    };
    let model = model.map(&mut m);
    match m.err {
        Some(e) => Err(e),
        None => Ok(model),
    }
}
