//! ZeRO stages 1 and 2 (Rajbhandari et al. 2020) on the host: each rank keeps AdamW moments only
//! for its shard of every trainable parameter — rows `chunk_range(rows, world, rank)` of dim 0
//! (the last shard may be smaller) — updates that shard, and all-gathers the updated rows.
//! Stage 2 also reduce-scatters the gradients, so a rank sums only the rows it owns.
//!
//! Under FSDP some parameters are already sharded ([`ZeroAdamW::with_presharded`]): the model holds
//! only this rank's rows and their gradient arrives reduced, so the optimizer updates them in place
//! with no collective.
//!
//! The AdamW arithmetic is burn 0.21's (`burn-optim` `adamw.rs`), operation for operation in f32,
//! so a ZeRO run follows the DDP run's trajectory (tested against it across processes).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{backend::AutodiffBackend, Tensor, TensorData};

use bellows_dist::{chunk_range, ProcessGroup, ReduceOp};

use crate::adamw::Consts;
use crate::Result;

/// AdamW hyper-parameters (the `[optim]` section's).
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

/// One parameter's shard of optimizer state.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardState {
    /// Global shape of the parameter.
    pub shape: Vec<usize>,
    /// This rank's element range in the flattened parameter (whole rows of dim 0).
    pub range: Range<usize>,
    /// First moment of the shard.
    pub exp_avg: Vec<f32>,
    /// Second moment of the shard.
    pub exp_avg_sq: Vec<f32>,
    /// Steps taken.
    pub step: i64,
}

/// The sharded optimizer of one rank.
#[derive(Debug)]
pub struct ZeroAdamW {
    hp: AdamWParams,
    /// Stage 2: gradients are reduce-scattered (else all-reduced by the caller).
    pub stage2: bool,
    rank: usize,
    world: usize,
    /// State by parameter path.
    pub state: HashMap<String, ShardState>,
    /// FSDP: parameters whose value and gradient are already this rank's rows, by id, with the
    /// full shape.
    presharded: HashMap<ParamId, Vec<usize>>,
    /// Hybrid sharding: the ranks holding the same shard on other nodes; reduce-scattered
    /// gradients are summed over them too.
    replicas: Option<Arc<ProcessGroup>>,
}

/// A trainable parameter as the optimizer sees it (host copies).
struct Item {
    id: ParamId,
    path: String,
    shape: Vec<usize>,
    grad: Vec<f32>,
}

/// The rows of dim 0 that `rank` owns, as a flat element range.
pub fn shard_range(shape: &[usize], world: usize, rank: usize) -> Range<usize> {
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let cols: usize = shape.iter().skip(1).product();
    let r = chunk_range(rows, world, rank);
    r.start * cols..r.end * cols
}

/// The slot size of equal-chunk collectives over a `shape` parameter: the largest rank's rows.
fn slot_len(shape: &[usize], world: usize) -> usize {
    (0..world)
        .map(|r| shard_range(shape, world, r).len())
        .max()
        .unwrap_or(0)
}

/// `buf` (one value per element of a `shape` parameter) laid out as `world` equal slots, slot
/// `r` holding rank `r`'s rows padded with zeros: what equal-chunk collectives need.
fn to_slots(buf: &[f32], shape: &[usize], world: usize) -> (Vec<f32>, usize) {
    let slot = slot_len(shape, world);
    let mut out = vec![0f32; slot * world];
    for r in 0..world {
        let range = shard_range(shape, world, r);
        out[r * slot..r * slot + range.len()].copy_from_slice(&buf[range]);
    }
    (out, slot)
}

/// Every rank's rows of a `shape` parameter, given this rank's (`mine`), in row order: the
/// whole flattened parameter on every rank.
fn gather_rows(pg: &ProcessGroup, mine: &[f32], shape: &[usize]) -> Result<Vec<f32>> {
    let world = pg.world_size();
    if world == 1 {
        return Ok(mine.to_vec());
    }
    let slot = slot_len(shape, world);
    let mut padded = vec![0f32; slot];
    padded[..mine.len()].copy_from_slice(mine);
    let mut all = vec![0f32; slot * world];
    pg.all_gather(&padded, &mut all)?;
    let mut out = Vec::with_capacity(shape.iter().product());
    for r in 0..world {
        let n = shard_range(shape, world, r).len();
        out.extend_from_slice(&all[r * slot..r * slot + n]);
    }
    Ok(out)
}

struct Stack(Vec<String>);

struct Collect<'a> {
    stack: Stack,
    grads: &'a GradientsParams,
    pg: &'a ProcessGroup,
    stage2: bool,
    presharded: &'a HashMap<ParamId, Vec<usize>>,
    replicas: Option<&'a ProcessGroup>,
    items: Vec<Item>,
    err: Option<bellows_dist::Error>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
    fn enter_module(&mut self, name: &str, _c: &str) {
        self.stack.0.push(name.to_string());
    }
    fn exit_module(&mut self, _n: &str, _c: &str) {
        self.stack.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) else {
            return;
        };
        let (world, rank) = (self.pg.world_size(), self.pg.rank());
        let host = |t: Tensor<B::InnerBackend, D>| {
            t.into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default()
        };
        if let Some(full) = self.presharded.get(&p.id) {
            // FSDP: the gradient is this rank's rows, already summed over ranks.
            self.items.push(Item {
                id: p.id,
                path: self.stack.0.join("."),
                shape: full.clone(),
                grad: host(g),
            });
            return;
        }
        let shape = g.dims().to_vec();
        let range = shard_range(&shape, world, rank);
        // One parameter at a time, so at most one full gradient is on the host.
        let grad = if self.stage2 && (world > 1 || self.replicas.is_some()) {
            let (slots, slot) = to_slots(&host(g), &shape, world);
            let mut mine = vec![0f32; slot];
            if self.err.is_none() {
                let summed = self
                    .pg
                    .reduce_scatter(&slots, &mut mine, ReduceOp::Sum)
                    .and_then(|()| match self.replicas {
                        Some(r) => r.all_reduce(&mut mine, ReduceOp::Sum),
                        None => Ok(()),
                    });
                if let Err(e) = summed {
                    self.err = Some(e);
                }
            }
            mine.truncate(range.len());
            mine
        } else {
            let rows = chunk_range(shape[0].max(1), world, rank);
            host(g.narrow(0, rows.start, rows.len()))
        };
        self.items.push(Item {
            id: p.id,
            path: self.stack.0.join("."),
            shape,
            grad,
        });
    }
}

/// Replaces parameters by id with new host values (kept in each parameter's dtype).
struct Put {
    values: HashMap<ParamId, Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Put {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(values) = self.values.remove(&p.id) else {
            return p;
        };
        let id = p.id;
        let t = p.val();
        let (device, dtype, shape) = (t.device(), t.dtype(), t.dims());
        let t = Tensor::<B, D>::from_data(TensorData::new(values, shape), (&device, dtype));
        Param::initialized(id, t.require_grad())
    }
}

impl ZeroAdamW {
    /// A fresh optimizer for rank `rank` of `world`.
    pub fn new(hp: AdamWParams, stage2: bool, rank: usize, world: usize) -> Self {
        ZeroAdamW {
            hp,
            stage2,
            rank,
            world,
            state: HashMap::new(),
            presharded: HashMap::new(),
            replicas: None,
        }
    }

    /// Hybrid sharding: after each reduce-scatter over the shard group, gradients are summed over
    /// `replicas` (the ranks with the same shard on the other nodes); `None` for no replicas.
    pub fn with_replicas(mut self, replicas: Option<Arc<ProcessGroup>>) -> Self {
        self.replicas = replicas;
        self
    }

    /// This rank within the shard group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the shard group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether this rank writes its shards in sharded checkpoints: the first replica (every rank
    /// without hybrid sharding).
    pub fn writes_shards(&self) -> bool {
        self.replicas.as_ref().is_none_or(|r| r.rank() == 0)
    }

    /// FSDP: `shapes` (parameter id → full shape) name parameters the model already holds as
    /// this rank's rows ([`shard_range`]) with gradients reduced over ranks; they are updated in
    /// place, without reduce-scatter or all-gather. Their state is kept and checkpointed like
    /// every other parameter's.
    pub fn with_presharded(
        mut self,
        shapes: impl IntoIterator<Item = (ParamId, Vec<usize>)>,
    ) -> Self {
        self.presharded.extend(shapes);
        self
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        self.state
            .values()
            .map(|s| 4 * (s.exp_avg.len() + s.exp_avg_sq.len()))
            .sum()
    }

    /// Sums the gradients of this rank's rows across ranks (stage 2: reduce-scatter; stage 1:
    /// the caller already all-reduced them, so this only keeps the rows). Returns per parameter
    /// (id, path, shape, summed grad rows) and the global Σg² over all ranks' rows.
    fn my_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: &M,
        grads: &GradientsParams,
        pg: &ProcessGroup,
    ) -> Result<(Vec<Item>, f64)> {
        let mut c = Collect {
            stack: Stack(Vec::new()),
            grads,
            pg,
            stage2: self.stage2,
            presharded: &self.presharded,
            replicas: self.replicas.as_deref(),
            items: Vec::new(),
            err: None,
        };
        model.visit(&mut c);
        if let Some(e) = c.err {
            return Err(e.into());
        }
        let local_sq: f64 = c
            .items
            .iter()
            .flat_map(|it| it.grad.iter())
            .map(|&g| f64::from(g) * f64::from(g))
            .sum();
        // The norm of the whole gradient: every rank's rows, once each.
        let mut sq = [local_sq];
        if self.world > 1 {
            pg.all_reduce(&mut sq, ReduceOp::Sum)?;
        }
        Ok((c.items, sq[0]))
    }

    /// One step: global gradient norm (returned, before `factor`), then for every trainable
    /// parameter AdamW on this rank's rows of `grads · factor` and an all-gather of the rows.
    /// With `apply = None`, only the norm is computed (the caller decides first whether to step,
    /// e.g. on a non-finite norm); call [`ZeroAdamW::step`] with `Some(factor)` to update.
    ///
    /// # Errors
    /// A collective fails.
    pub fn step<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: M,
        grads: &GradientsParams,
        pg: &ProcessGroup,
        lr: f64,
        decide: impl FnOnce(f64) -> Option<f64>,
    ) -> Result<(M, f64)> {
        let (items, sq) = self.my_grads(&model, grads, pg)?;
        let norm = sq.sqrt();
        let Some(factor) = decide(norm) else {
            return Ok((model, norm));
        };
        // One parameter at a time: fetch this rank's rows, update them, gather every rank's
        // rows and write the parameter back, so no second copy of the model is ever held.
        let mut model = model;
        for it in items {
            let range = shard_range(&it.shape, self.world, self.rank);
            let st = self
                .state
                .entry(it.path.clone())
                .or_insert_with(|| ShardState {
                    shape: it.shape.clone(),
                    range: range.clone(),
                    exp_avg: vec![0.0; range.len()],
                    exp_avg_sq: vec![0.0; range.len()],
                    step: 0,
                });
            let presharded = self.presharded.contains_key(&it.id);
            let mut mine = if presharded {
                // The parameter is the shard: all of its rows.
                let mut local = it.shape.clone();
                local[0] = chunk_range(it.shape[0], self.world, self.rank).len();
                host_rows(&model, it.id, &local, 1, 0)
            } else {
                host_rows(&model, it.id, &it.shape, self.world, self.rank)
            };
            adamw_rows(&self.hp, st, &mut mine, &it.grad, factor as f32, lr);
            let updated = if presharded {
                mine
            } else {
                gather_rows(pg, &mine, &it.shape)?
            };
            model = model.map(&mut Put {
                values: HashMap::from([(it.id, updated)]),
            });
        }
        Ok((model, norm))
    }
}

/// This rank's rows of parameter `id` (of shape `shape`) as f32, copied from the device.
fn host_rows<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    id: ParamId,
    shape: &[usize],
    world: usize,
    rank: usize,
) -> Vec<f32> {
    struct Get {
        id: ParamId,
        rows: Range<usize>,
        out: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Get {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if p.id == self.id {
                self.out = p
                    .val()
                    .narrow(0, self.rows.start, self.rows.len())
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap_or_default();
            }
        }
    }
    let mut g = Get {
        id,
        rows: chunk_range(shape.first().copied().unwrap_or(1).max(1), world, rank),
        out: Vec::new(),
    };
    model.visit(&mut g);
    g.out
}

impl ZeroAdamW {
    /// The whole optimizer state, gathered from every rank, as checkpoint tensors
    /// (`<path>.exp_avg`, `<path>.exp_avg_sq`, `<path>.step`: the DDP optimizer's format, so a
    /// ZeRO checkpoint is also a DDP one). Every rank must call it.
    ///
    /// # Errors
    /// A collective fails.
    pub fn consolidated(&self, pg: &ProcessGroup) -> Result<Vec<(String, TensorData)>> {
        let mut paths: Vec<&String> = self.state.keys().collect();
        paths.sort();
        let mut out = Vec::new();
        for path in paths {
            let st = &self.state[path];
            for (key, part) in [("exp_avg", &st.exp_avg), ("exp_avg_sq", &st.exp_avg_sq)] {
                let full = gather_rows(pg, part, &st.shape)?;
                out.push((
                    format!("{path}.{key}"),
                    TensorData::new(full, st.shape.clone()),
                ));
            }
            out.push((format!("{path}.step"), TensorData::new(vec![st.step], [1])));
        }
        Ok(out)
    }
}

/// burn 0.21's AdamW on one shard, in the same f32 operations and order
/// ([`crate::adamw::Consts::update`], in parallel chunks), on `grads · factor`.
fn adamw_rows(
    hp: &AdamWParams,
    st: &mut ShardState,
    p: &mut [f32],
    g: &[f32],
    factor: f32,
    lr: f64,
) {
    let first = st.step == 0;
    st.step += 1;
    let c = Consts::new(hp, lr, st.step as usize).with_grad_scale(factor);
    c.apply(p, g, (&mut st.exp_avg, &mut st.exp_avg_sq), first);
}

impl ZeroAdamW {
    /// This rank's rows of the optimizer state as checkpoint tensors, for a sharded checkpoint:
    /// `(name, rows, global shape)` for `<path>.exp_avg` / `<path>.exp_avg_sq`, and the
    /// `<path>.step` counts (whole) when `with_steps`.
    pub fn own_tensors(&self, with_steps: bool) -> Vec<(String, TensorData, Vec<usize>)> {
        let mut paths: Vec<&String> = self.state.keys().collect();
        paths.sort();
        let mut out = Vec::new();
        for path in paths {
            let st = &self.state[path];
            let mut local = st.shape.clone();
            if let Some(d0) = local.first_mut() {
                *d0 = chunk_range((*d0).max(1), self.world, self.rank).len();
            }
            for (key, part) in [("exp_avg", &st.exp_avg), ("exp_avg_sq", &st.exp_avg_sq)] {
                out.push((
                    format!("{path}.{key}"),
                    TensorData::new(part.clone(), local.clone()),
                    st.shape.clone(),
                ));
            }
            if with_steps {
                out.push((
                    format!("{path}.step"),
                    TensorData::new(vec![st.step], [1]),
                    vec![1],
                ));
            }
        }
        out
    }

    /// Takes this rank's rows of the state in `src` (a consolidated or a sharded checkpoint,
    /// written by any world size).
    ///
    /// # Errors
    /// A tensor is incomplete, unreadable or not f32 / i64.
    pub fn load_from(&mut self, src: &dyn crate::checkpoint::TensorReader) -> Result<()> {
        let bad = |k: &str, m: &str| crate::Error::Internal(format!("optimizer state {k}: {m}"));
        for key in src.names() {
            let Some(path) = key.strip_suffix(".exp_avg") else {
                continue;
            };
            let (k2, k3) = (format!("{path}.exp_avg_sq"), format!("{path}.step"));
            let (Some((shape, _)), Some(_), Some(_)) =
                (src.meta(&key), src.meta(&k2), src.meta(&k3))
            else {
                return Err(bad(path, "incomplete"));
            };
            let rows = chunk_range(
                shape.first().copied().unwrap_or(1).max(1),
                self.world,
                self.rank,
            );
            let f = |k: &str| -> Result<Vec<f32>> {
                src.rows(k, rows.clone())?
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .map_err(|e| bad(k, &format!("{e:?}")))
            };
            let step = src
                .whole(&k3)?
                .to_vec::<i64>()
                .ok()
                .and_then(|v| v.first().copied())
                .ok_or_else(|| bad(&k3, "not an i64"))?;
            let range = shard_range(&shape, self.world, self.rank);
            self.state.insert(
                path.to_string(),
                ShardState {
                    exp_avg: f(&key)?,
                    exp_avg_sq: f(&k2)?,
                    shape,
                    range,
                    step,
                },
            );
        }
        Ok(())
    }
}
