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
    /// The whole gradient → this rank's rows of its sum over ranks.
    ReduceScatter {
        full: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    /// Nothing: its reply says every earlier job is done.
    Fence,
}

/// The reply to a job: values, or the failed collective's message.
pub(crate) type Reply = Result<Vec<f32>, String>;

/// Runs `job` now, on this thread.
pub(crate) fn run(comm: &dyn Collective, job: Job) -> Reply {
    let world = comm.world();
    let slot = |rows: usize, cols: usize| shard_rows(rows, world, 0).len() * cols;
    match job {
        Job::Fence => Ok(Vec::new()),
        Job::Gather { mine, .. } if world == 1 => Ok(mine),
        Job::ReduceScatter { full, .. } if world == 1 => Ok(full),
        Job::Gather {
            mut mine,
            rows,
            cols,
        } => {
            let slot = slot(rows, cols);
            mine.resize(slot, 0.0);
            let mut all = vec![0f32; slot * world];
            comm.all_gather(&mine, &mut all)?;
            let mut out = Vec::with_capacity(rows * cols);
            for r in 0..world {
                let n = shard_rows(rows, world, r).len() * cols;
                out.extend_from_slice(&all[r * slot..r * slot + n]);
            }
            Ok(out)
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
            Ok(mine)
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
