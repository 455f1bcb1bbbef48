//! The host-side collectives of sharded weights, run either in place or, with prefetching, on
//! one communication thread that executes them in submission order — so every rank still issues
//! the same collectives in the same order, while the compute thread goes on.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use super::{shard_rows, Collective};

/// One collective over a weight of `rows` rows and `cols` values per row.
pub(crate) enum Job {
    /// This rank's rows (unpadded) → the whole weight.
    Gather {
        mine: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    /// This rank's rows of bytes (unpadded) → the whole byte tensor (NF4 storage).
    GatherBytes {
        mine: Vec<u8>,
        rows: usize,
        cols: usize,
    },
    /// The whole gradient → this rank's rows of its sum over ranks.
    ReduceScatter {
        full: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    /// Nothing: its reply says every earlier job is done.
    Fence,
}

/// What a job gives back.
pub(crate) enum Payload {
    /// Values.
    F32(Vec<f32>),
    /// Bytes.
    U8(Vec<u8>),
}

/// The reply to a job, or the failed collective's message.
pub(crate) type Reply = Result<Payload, String>;

/// Gathers equal-size rows split by [`shard_rows`]: pads `mine` to the largest rank's rows,
/// all-gathers with `gather`, and drops the padding.
fn gather_rows<T: Copy + Default>(
    mut mine: Vec<T>,
    rows: usize,
    cols: usize,
    world: usize,
    gather: impl FnOnce(&[T], &mut [T]) -> Result<(), String>,
) -> Result<Vec<T>, String> {
    let slot = shard_rows(rows, world, 0).len() * cols;
    mine.resize(slot, T::default());
    let mut all = vec![T::default(); slot * world];
    gather(&mine, &mut all)?;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..world {
        let n = shard_rows(rows, world, r).len() * cols;
        out.extend_from_slice(&all[r * slot..r * slot + n]);
    }
    Ok(out)
}

/// Runs `job` now, on this thread.
pub(crate) fn run(comm: &dyn Collective, job: Job) -> Reply {
    let world = comm.world();
    let slot = |rows: usize, cols: usize| shard_rows(rows, world, 0).len() * cols;
    match job {
        Job::Fence => Ok(Payload::F32(Vec::new())),
        Job::Gather { mine, .. } if world == 1 => Ok(Payload::F32(mine)),
        Job::GatherBytes { mine, .. } if world == 1 => Ok(Payload::U8(mine)),
        Job::ReduceScatter { full, .. } if world == 1 => Ok(Payload::F32(full)),
        Job::Gather { mine, rows, cols } => {
            gather_rows(mine, rows, cols, world, |a, b| comm.all_gather(a, b)).map(Payload::F32)
        }
        Job::GatherBytes { mine, rows, cols } => {
            gather_rows(mine, rows, cols, world, |a, b| comm.all_gather_bytes(a, b))
                .map(Payload::U8)
        }
        Job::ReduceScatter { full, rows, cols } => {
            let slot = slot(rows, cols);
            let mut slots = vec![0f32; slot * world];
            for r in 0..world {
                let range = shard_rows(rows, world, r);
                slots[r * slot..r * slot + range.len() * cols]
                    .copy_from_slice(&full[range.start * cols..range.end * cols]);
            }
            let mut mine = vec![0f32; slot];
            comm.reduce_scatter_sum(&slots, &mut mine)?;
            mine.truncate(shard_rows(rows, world, comm.rank()).len() * cols);
            Ok(Payload::F32(mine))
        }
    }
}

/// A communication thread: jobs run one at a time, in the order they were submitted.
pub(crate) struct CommThread {
    jobs: Sender<(Job, Sender<Reply>)>,
}

impl CommThread {
    /// Starts the thread; it ends when the last handle is dropped.
    pub(crate) fn start(comm: Arc<dyn Collective>) -> std::io::Result<Self> {
        let (jobs, rx) = channel::<(Job, Sender<Reply>)>();
        std::thread::Builder::new()
            .name("bellows-fsdp-comm".into())
            .spawn(move || {
                for (job, reply) in rx {
                    // The submitter may have stopped waiting (an error elsewhere): ignore that.
                    let _ = reply.send(run(&*comm, job));
                }
            })?;
        Ok(CommThread { jobs })
    }

    /// Queues `job`; the receiver gets its reply.
    pub(crate) fn submit(&self, job: Job) -> Receiver<Reply> {
        let (tx, rx) = channel();
        if let Err(e) = self.jobs.send((job, tx.clone())) {
            let _ = tx.send(Err(format!("the communication thread has stopped: {e}")));
        }
        rx
    }
}

/// Waits for a queued job's reply.
pub(crate) fn wait(ticket: Receiver<Reply>) -> Reply {
    ticket
        .recv()
        .unwrap_or_else(|_| Err("the communication thread stopped before replying".into()))
}
