//! Sharded weights for fully sharded data parallelism (FSDP / ZeRO-3, Rajbhandari et al. 2020;
//! Zhao et al. 2023): a rank keeps only rows [`shard_rows`] of dim 0 of a weight; the full weight
//! is all-gathered right before it is used and dropped right after, and gathered again in the
//! backward pass. The gradient of the full weight is reduce-scattered, so each rank receives the
//! sum over ranks of its own rows.
//!
//! The collectives come from the caller through [`Collective`] (this crate depends on no other
//! bellows crate); `bellows-trainer` implements it over its process group. A collective that
//! fails inside a forward or backward pass cannot return an error there: the failure is kept in
//! the [`Sharding`] (read it with [`Sharding::take_error`] after each pass), the values are
//! zeros, and the process group is broken, so every later collective fails too.

mod embedding;
mod matmul;

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

pub use embedding::sharded_embedding;
pub use matmul::sharded_matmul_t;

/// Equal-chunk collectives over `f32` host buffers, summed in a fixed order on every rank.
pub trait Collective: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Every rank's `mine` (all of one length), concatenated in rank order into `all`.
    ///
    /// # Errors
    /// A message naming the failed collective and the rank.
    fn all_gather(&self, mine: &[f32], all: &mut [f32]) -> Result<(), String>;
    /// Sums `all` (world equal chunks) over ranks and keeps this rank's chunk in `mine`.
    ///
    /// # Errors
    /// A message naming the failed collective and the rank.
    fn reduce_scatter_sum(&self, all: &[f32], mine: &mut [f32]) -> Result<(), String>;
}

/// The rows of a `rows`-row weight that `rank` of `world` keeps: contiguous, in rank order, the
/// first `rows % world` ranks one row more (the same split as `bellows_dist::chunk_range`).
pub fn shard_rows(rows: usize, world: usize, rank: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (rows / world, rows % world);
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start.min(rows)..(start + size).min(rows)
}

/// How one weight is sharded: the collectives, its full row count and the error slot.
#[derive(Clone)]
pub struct Sharding {
    comm: Arc<dyn Collective>,
    /// Rows of the full weight (dim 0).
    pub rows: usize,
    error: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for Sharding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sharding")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world())
            .field("rows", &self.rows)
            .finish()
    }
}

/// The collectives and error slot shared by every weight of one model.
#[derive(Clone)]
pub struct ShardGroup {
    comm: Arc<dyn Collective>,
    error: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for ShardGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardGroup")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world())
            .finish()
    }
}

impl ShardGroup {
    /// A group over `comm`.
    pub fn new(comm: Arc<dyn Collective>) -> Self {
        ShardGroup {
            comm,
            error: Arc::new(Mutex::new(None)),
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.comm.world()
    }

    /// The sharding of a weight with `rows` rows in this group.
    pub fn sharding(&self, rows: usize) -> Sharding {
        Sharding {
            comm: self.comm.clone(),
            rows,
            error: self.error.clone(),
        }
    }

    /// The first collective failure since the last call, if any (see the module docs).
    pub fn take_error(&self) -> Option<String> {
        self.error.lock().map(|mut e| e.take()).unwrap_or(None)
    }

    /// This rank's rows of `full`, copied into a tensor of their own (so `full` can be freed),
    /// detached from any graph.
    pub fn shard<B: Backend, const D: usize>(&self, full: Tensor<B, D>) -> Tensor<B, D> {
        let r = shard_rows(full.dims()[0], self.world(), self.rank());
        let (device, dtype) = (full.device(), full.dtype());
        Tensor::from_data(
            full.narrow(0, r.start, r.len()).into_data(),
            (&device, dtype),
        )
    }
}

impl Sharding {
    /// This rank's rows.
    pub fn my_rows(&self) -> Range<usize> {
        shard_rows(self.rows, self.comm.world(), self.comm.rank())
    }

    /// The largest rank's rows: the slot size of the equal-chunk collectives, in rows.
    fn slot_rows(&self) -> usize {
        shard_rows(self.rows, self.comm.world(), 0).len()
    }

    pub(crate) fn fail(&self, e: String) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
    }

    /// The full weight `[rows, ..]` from this rank's `shard`, in `dtype` (every rank must call it).
    pub fn gather<B: Backend, const D: usize>(
        &self,
        shard: Tensor<B, D>,
        dtype: DType,
    ) -> Tensor<B, D> {
        let device = shard.device();
        let mut dims = shard.dims();
        let cols: usize = dims[1..].iter().product();
        let world = self.comm.world();
        dims[0] = self.rows;
        let mine = to_host(shard);
        let full = if world == 1 {
            mine
        } else {
            let slot = self.slot_rows() * cols;
            let mut padded = mine;
            padded.resize(slot, 0.0);
            let mut all = vec![0f32; slot * world];
            if let Err(e) = self.comm.all_gather(&padded, &mut all) {
                self.fail(e);
            }
            let mut out = Vec::with_capacity(self.rows * cols);
            for r in 0..world {
                let n = shard_rows(self.rows, world, r).len() * cols;
                out.extend_from_slice(&all[r * slot..r * slot + n]);
            }
            out
        };
        Tensor::from_data(TensorData::new(full, dims), (&device, dtype))
    }

    /// This rank's rows of `Σ_ranks full` for a full-size gradient `full`, in `dtype`.
    pub fn reduce_scatter<B: Backend, const D: usize>(
        &self,
        full: Tensor<B, D>,
        dtype: DType,
    ) -> Tensor<B, D> {
        let device = full.device();
        let mut dims = full.dims();
        let cols: usize = dims[1..].iter().product();
        let world = self.comm.world();
        let rows = self.my_rows();
        dims[0] = rows.len();
        let values = to_host(full);
        let mine = if world == 1 {
            values
        } else {
            let slot = self.slot_rows() * cols;
            let mut slots = vec![0f32; slot * world];
            for r in 0..world {
                let range = shard_rows(self.rows, world, r);
                slots[r * slot..r * slot + range.len() * cols]
                    .copy_from_slice(&values[range.start * cols..range.end * cols]);
            }
            let mut mine = vec![0f32; slot];
            if let Err(e) = self.comm.reduce_scatter_sum(&slots, &mut mine) {
                self.fail(e);
            }
            mine.truncate(rows.len() * cols);
            mine
        };
        Tensor::from_data(TensorData::new(mine, dims), (&device, dtype))
    }
}

fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

#[cfg(test)]
mod tests;
