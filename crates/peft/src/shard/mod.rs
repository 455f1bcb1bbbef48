//! Sharded weights for fully sharded data parallelism (FSDP / ZeRO-3, Rajbhandari et al. 2020;
//! Zhao et al. 2023): a rank keeps only rows [`shard_rows`] of dim 0 of a weight; the full weight
//! is all-gathered right before it is used and dropped right after, and gathered again in the
//! backward pass. The gradient of the full weight is reduce-scattered, so each rank receives the
//! sum over ranks of its own rows.
//!
//! The collectives come from the caller through [`Collective`] (this crate depends on no other
//! bellows crate); `bellows-trainer` implements it over its process group. A collective that
//! fails inside a forward or backward pass cannot return an error there: the failure is kept in
//! the group (read it with [`ShardGroup::settle`] after each pass), the values are zeros, and
//! the process group is broken, so every later collective fails too.
//!
//! Prefetching ([`ShardGroup::with_prefetch`]): collectives run on one communication thread in
//! the order they are started, so the forward pass can start the next layer's gathers
//! ([`Sharding::prefetch`]) and the backward pass the previous layer's while the current layer
//! computes — PyTorch FSDP's forward and backward prefetch.

mod comm;
mod embedding;
mod matmul;
mod nf4;

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use comm::{CommThread, Job, Payload, Reply};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

pub use embedding::sharded_embedding;
pub use matmul::sharded_matmul_t;
pub(crate) use nf4::{gather_nf4, shard_nf4, sharded_nf4_matmul_t};

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
    /// [`Collective::all_gather`] for bytes (NF4 storage).
    ///
    /// # Errors
    /// A message naming the failed collective and the rank.
    fn all_gather_bytes(&self, mine: &[u8], all: &mut [u8]) -> Result<(), String>;
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

/// What every sharded weight of one model shares: the collectives, the error slot and, with
/// prefetching, the communication thread, the gathers it is running ahead of use, and the
/// forward order of the weights (for prefetching in the backward pass).
struct Shared {
    comm: Arc<dyn Collective>,
    error: Mutex<Option<String>>,
    thread: Option<CommThread>,
    pending: Mutex<HashMap<u64, Receiver<Reply>>>,
    trail: Mutex<Vec<TrailEntry>>,
    next_key: AtomicU64,
}

/// A weight used in the forward pass, remembered so its gather can be started early in backward.
struct TrailEntry {
    key: u64,
    rows: usize,
    cols: usize,
    host: Option<Box<dyn FnOnce() -> Vec<f32> + Send>>,
}

impl Shared {
    fn fail(&self, e: String) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
    }

    /// Runs `job` (on the communication thread when there is one, after everything queued).
    fn start(&self, job: Job) -> Ticket {
        match &self.thread {
            Some(t) => Ticket::Queued(t.submit(job)),
            None => Ticket::Done(comm::run(&*self.comm, job)),
        }
    }
}

/// A started collective.
enum Ticket {
    Done(Reply),
    Queued(Receiver<Reply>),
}

impl Ticket {
    fn wait(self) -> Reply {
        match self {
            Ticket::Done(r) => r,
            Ticket::Queued(rx) => comm::wait(rx),
        }
    }

    fn values(self) -> Result<Vec<f32>, String> {
        match self.wait()? {
            Payload::F32(v) => Ok(v),
            Payload::U8(_) => Err("a collective returned bytes where values were due".into()),
        }
    }

    fn bytes(self) -> Result<Vec<u8>, String> {
        match self.wait()? {
            Payload::U8(v) => Ok(v),
            Payload::F32(_) => Err("a collective returned values where bytes were due".into()),
        }
    }
}

/// How one weight is sharded: its group, full row count and identity within the group.
#[derive(Clone)]
pub struct Sharding {
    shared: Arc<Shared>,
    /// Rows of the full weight (dim 0).
    pub rows: usize,
    key: u64,
}

impl fmt::Debug for Sharding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sharding")
            .field("rank", &self.shared.comm.rank())
            .field("world", &self.shared.comm.world())
            .field("rows", &self.rows)
            .finish()
    }
}

/// The collectives and error slot shared by every weight of one model.
#[derive(Clone)]
pub struct ShardGroup {
    shared: Arc<Shared>,
}

impl fmt::Debug for ShardGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardGroup")
            .field("rank", &self.rank())
            .field("world", &self.world())
            .field("prefetch", &self.shared.thread.is_some())
            .finish()
    }
}

impl ShardGroup {
    /// A group over `comm`; every gather runs when its weight is used.
    pub fn new(comm: Arc<dyn Collective>) -> Self {
        Self::build(comm, None)
    }

    /// A group over `comm` whose collectives run on a communication thread, so the gathers of
    /// the next layer ([`Sharding::prefetch`], and in the backward pass the previous layer) run
    /// while the current one computes.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn with_prefetch(comm: Arc<dyn Collective>) -> std::io::Result<Self> {
        let thread = CommThread::start(comm.clone())?;
        Ok(Self::build(comm, Some(thread)))
    }

    fn build(comm: Arc<dyn Collective>, thread: Option<CommThread>) -> Self {
        ShardGroup {
            shared: Arc::new(Shared {
                comm,
                error: Mutex::new(None),
                thread,
                pending: Mutex::new(HashMap::new()),
                trail: Mutex::new(Vec::new()),
                next_key: AtomicU64::new(0),
            }),
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.shared.comm.rank()
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.shared.comm.world()
    }

    /// The sharding of a (new) weight with `rows` rows in this group.
    pub fn sharding(&self, rows: usize) -> Sharding {
        Sharding {
            shared: self.shared.clone(),
            rows,
            key: self.shared.next_key.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Waits for every queued collective, forgets prefetched gathers and the forward order, and
    /// returns the first collective failure since the last call, if any (see the module docs).
    /// Call it after each backward pass, before any other collective of the process group.
    pub fn settle(&self) -> Option<String> {
        if self.shared.thread.is_some() {
            if let Err(e) = self.shared.start(Job::Fence).wait() {
                self.shared.fail(e);
            }
            let pending: Vec<_> = self
                .shared
                .pending
                .lock()
                .map(|mut p| p.drain().map(|(_, t)| t).collect())
                .unwrap_or_default();
            for t in pending {
                if let Err(e) = comm::wait(t) {
                    self.shared.fail(e);
                }
            }
            if let Ok(mut t) = self.shared.trail.lock() {
                t.clear();
            }
        }
        self.shared
            .error
            .lock()
            .map(|mut e| e.take())
            .unwrap_or(None)
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
        shard_rows(self.rows, self.shared.comm.world(), self.shared.comm.rank())
    }

    pub(crate) fn fail(&self, e: String) {
        self.shared.fail(e);
    }

    fn pending(&self) -> Option<Receiver<Reply>> {
        self.shared.pending.lock().ok()?.remove(&self.key)
    }

    /// Starts gathering this weight from this rank's `shard` ahead of its use, when the group
    /// prefetches (a no-op otherwise, or when already started). Every rank must call it alike.
    pub fn prefetch<B: Backend, const D: usize>(&self, shard: Tensor<B, D>) {
        let Some(thread) = &self.shared.thread else {
            return;
        };
        let Ok(mut pending) = self.shared.pending.lock() else {
            return;
        };
        pending.entry(self.key).or_insert_with(|| {
            let cols: usize = shard.dims()[1..].iter().product();
            thread.submit(Job::Gather {
                mine: to_host(shard),
                rows: self.rows,
                cols,
            })
        });
    }

    /// Remembers this weight's use in the forward pass (with its `shard`), so the backward pass
    /// can start its gather early ([`Sharding::prefetch_previous`]). A no-op without prefetching.
    pub(crate) fn remember<B: Backend, const D: usize>(&self, shard: Tensor<B, D>) {
        if self.shared.thread.is_none() {
            return;
        }
        let dims = shard.dims();
        let cols: usize = dims[1..].iter().product();
        if let Ok(mut trail) = self.shared.trail.lock() {
            trail.push(TrailEntry {
                key: self.key,
                rows: self.rows,
                cols,
                host: Some(Box::new(move || to_host(shard))),
            });
        }
    }

    /// In the backward pass: starts gathering the weight used just before this one in the
    /// forward pass (the next one the backward pass needs). A no-op without prefetching.
    pub(crate) fn prefetch_previous(&self) {
        let Some(thread) = &self.shared.thread else {
            return;
        };
        let entry = self.shared.trail.lock().ok().and_then(|mut trail| {
            let at = trail.iter().rposition(|e| e.key == self.key)?;
            trail.truncate(at + 1);
            trail.pop();
            let prev = trail.last_mut()?;
            Some((prev.key, prev.rows, prev.cols, prev.host.take()?))
        });
        let Some((key, rows, cols, host)) = entry else {
            return;
        };
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.entry(key).or_insert_with(|| {
                thread.submit(Job::Gather {
                    mine: host(),
                    rows,
                    cols,
                })
            });
        }
    }

    /// Starts the gather of this weight (or takes the prefetched one).
    fn begin_gather<B: Backend, const D: usize>(&self, shard: &Tensor<B, D>) -> Ticket {
        if let Some(t) = self.pending() {
            return Ticket::Queued(t);
        }
        let dims = shard.dims();
        let cols: usize = dims[1..].iter().product();
        self.shared.start(Job::Gather {
            mine: to_host(shard.clone()),
            rows: self.rows,
            cols,
        })
    }

    /// The whole weight from a started gather, as a tensor like `shard` with all rows.
    fn end_gather<B: Backend, const D: usize>(
        &self,
        ticket: Ticket,
        mut dims: [usize; D],
        device: &B::Device,
        dtype: DType,
    ) -> Tensor<B, D> {
        dims[0] = self.rows;
        let n: usize = dims.iter().product();
        let values = ticket.values().unwrap_or_else(|e| {
            self.fail(e);
            vec![0.0; n]
        });
        // Built in f32 and cast on the device, so a low-precision copy rounds exactly as the
        // unsharded path's `in_dtype` cast does.
        let full = Tensor::<B, D>::from_data(TensorData::new(values, dims), (device, DType::F32));
        if dtype == DType::F32 {
            full
        } else {
            full.cast(dtype)
        }
    }

    /// The full weight `[rows, ..]` from this rank's `shard`, in `dtype` (every rank must call it).
    pub fn gather<B: Backend, const D: usize>(
        &self,
        shard: Tensor<B, D>,
        dtype: DType,
    ) -> Tensor<B, D> {
        let ticket = self.begin_gather(&shard);
        self.end_gather(ticket, shard.dims(), &shard.device(), dtype)
    }

    /// In the backward pass: the full weight, with the previous weight's gather started while
    /// this one's completes.
    pub(crate) fn gather_for_backward<B: Backend, const D: usize>(
        &self,
        shard: Tensor<B, D>,
        dtype: DType,
    ) -> Tensor<B, D> {
        let ticket = self.begin_gather(&shard);
        self.prefetch_previous();
        self.end_gather(ticket, shard.dims(), &shard.device(), dtype)
    }

    /// The whole byte tensor of `rows × cols` bytes from this rank's rows `mine` (every rank must
    /// call it).
    pub(crate) fn gather_bytes(&self, mine: Vec<u8>, cols: usize) -> Vec<u8> {
        let job = Job::GatherBytes {
            mine,
            rows: self.rows,
            cols,
        };
        self.shared.start(job).bytes().unwrap_or_else(|e| {
            self.fail(e);
            vec![0; self.rows * cols]
        })
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
        dims[0] = self.my_rows().len();
        let job = Job::ReduceScatter {
            full: to_host(full),
            rows: self.rows,
            cols,
        };
        let n: usize = dims.iter().product();
        let mine = self.shared.start(job).values().unwrap_or_else(|e| {
            self.fail(e);
            vec![0.0; n]
        });
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
