//! The [`Accelerator`]: a small handle for identity, collectives and gradient sync, in the
//! spirit of Hugging Face Accelerate's, for users' own training loops.

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;

use std::sync::Arc;

use bellows_data::Shard;
use bellows_dist::{DistConfig, DistEnv, ProcessGroup, ReduceOp};

use crate::Result;

/// Rank identity, the process group and the gradient-sync policy of one worker.
#[derive(Debug)]
pub struct Accelerator {
    env: DistEnv,
    pg: Arc<ProcessGroup>,
    bucket_bytes: usize,
}

impl Accelerator {
    /// Joins the process group the environment describes (a single process when it describes none).
    /// `job_hash` identifies the job: ranks started with different jobs refuse each other.
    ///
    /// # Errors
    /// Inconsistent launch variables or a failed rendezvous.
    pub fn new(cfg: &DistConfig, job_hash: &str) -> Result<Self> {
        let env = DistEnv::from_env()?;
        let pg = if env.world_size > 1 {
            ProcessGroup::init(&env, cfg, job_hash)?
        } else {
            ProcessGroup::single()
        };
        Ok(Accelerator {
            env,
            pg: Arc::new(pg),
            bucket_bytes: (cfg.bucket_mb * 1024.0 * 1024.0) as usize,
        })
    }

    /// A single-process accelerator.
    pub fn single() -> Self {
        Accelerator {
            env: DistEnv::single(),
            pg: Arc::new(ProcessGroup::single()),
            bucket_bytes: 25 << 20,
        }
    }

    /// This process's global rank.
    pub fn rank(&self) -> usize {
        self.pg.rank()
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.pg.world_size()
    }

    /// This process's rank on its node.
    pub fn local_rank(&self) -> usize {
        self.env.local_rank
    }

    /// Processes on this node.
    pub fn local_world_size(&self) -> usize {
        self.env.local_world_size
    }

    /// Whether this is rank 0 (which writes logs and final outputs).
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's data shard.
    pub fn shard(&self) -> Shard {
        Shard {
            rank: self.rank(),
            world: self.world_size(),
        }
    }

    /// Where this process sits: node, rank on the node, ranks per node.
    pub fn placement(&self) -> bellows_dist::NodePlacement {
        self.env.placement()
    }

    /// The process group, for collectives.
    pub fn process_group(&self) -> &ProcessGroup {
        &self.pg
    }

    /// The process group as a shared handle, for what must outlive a borrow (FSDP's sharded
    /// weights carry it into their backward pass).
    pub fn shared_group(&self) -> Arc<ProcessGroup> {
        self.pg.clone()
    }

    /// Sums gradients across ranks (callers scale the loss by the global token count, so a sum
    /// gives the exact token-weighted mean).
    ///
    /// # Errors
    /// A collective fails.
    pub fn sync_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        Ok(crate::grads::all_reduce_sum(
            model,
            grads,
            &self.pg,
            self.bucket_bytes,
        )?)
    }

    /// Makes every rank's trainable parameters equal to rank 0's.
    ///
    /// # Errors
    /// A collective fails.
    pub fn broadcast_params<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: M,
    ) -> Result<M> {
        Ok(crate::grads::broadcast_params(model, &self.pg, 0)?)
    }

    /// Sums host values across ranks (in f64, in a fixed order, so every rank gets the same bits).
    ///
    /// # Errors
    /// A collective fails.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let mut buf = values.to_vec();
        self.pg.all_reduce(&mut buf, ReduceOp::Sum)?;
        Ok(buf)
    }

    /// Runs `f` on the main process only.
    pub fn on_main<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        self.is_main().then(f)
    }

    /// Waits for every rank.
    ///
    /// # Errors
    /// A collective fails.
    pub fn barrier(&self) -> Result<()> {
        Ok(self.pg.barrier()?)
    }

    /// Mean of one value across ranks.
    ///
    /// # Errors
    /// A collective fails.
    pub fn mean(&self, v: f32) -> Result<f32> {
        let mut b = [v];
        self.pg.all_reduce(&mut b, ReduceOp::Mean)?;
        Ok(b[0])
    }
}
