//! `dist.strategy = "fsdp"` (ZeRO stage 3): the model's weight matrices are sharded by rows across
//! ranks ([`bellows_models::CausalLm::shard`]), gathered per layer for each use and reduce-scattered
//! in the backward pass; the remaining small parameters (norms, biases, adapters) stay whole and
//! ZeRO-2 shards their optimizer state and gradients. One [`ZeroAdamW`] updates both.

use std::sync::Arc;

use bellows_dist::{ProcessGroup, ReduceOp};
use bellows_models::CausalLm;
use bellows_peft::{Collective, LoraPlan, ShardGroup};
use burn::module::ParamId;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::error::Error;
use crate::Result;

/// [`Collective`] over a [`ProcessGroup`].
struct GroupCollective(Arc<ProcessGroup>);

impl Collective for GroupCollective {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world_size()
    }
    fn all_gather(&self, mine: &[f32], all: &mut [f32]) -> std::result::Result<(), String> {
        self.0.all_gather(mine, all).map_err(|e| e.to_string())
    }
    fn reduce_scatter_sum(&self, all: &[f32], mine: &mut [f32]) -> std::result::Result<(), String> {
        self.0
            .reduce_scatter(all, mine, ReduceOp::Sum)
            .map_err(|e| e.to_string())
    }
}

/// The FSDP state of one rank: the group its sharded weights gather over.
#[derive(Debug, Clone)]
pub struct Fsdp {
    group: ShardGroup,
    pg: Arc<ProcessGroup>,
}

impl Fsdp {
    /// FSDP over `pg`; with `prefetch`, collectives run on a communication thread that gathers
    /// the next layer while the current one computes.
    ///
    /// # Errors
    /// The communication thread cannot be started.
    pub fn new(pg: Arc<ProcessGroup>, prefetch: bool) -> Result<Self> {
        let comm: Arc<dyn Collective> = Arc::new(GroupCollective(pg.clone()));
        let group = if prefetch {
            ShardGroup::with_prefetch(comm).map_err(|e| {
                Error::Internal(format!("fsdp: cannot start the communication thread: {e}"))
            })?
        } else {
            ShardGroup::new(comm)
        };
        Ok(Fsdp { group, pg })
    }

    /// The group the sharded weights gather over.
    pub fn group(&self) -> &ShardGroup {
        &self.group
    }

    /// What [`crate::zero::ZeroAdamW::with_presharded`] needs: each sharded weight's id and
    /// full shape.
    pub fn presharded<B: Backend>(model: &CausalLm<B>) -> Vec<(ParamId, Vec<usize>)> {
        model
            .sharded_params()
            .into_iter()
            .map(|p| (p.id, p.shape.to_vec()))
            .collect()
    }

    /// Broadcasts rank 0's whole (unsharded) trainable parameters, as DDP does for all of them;
    /// sharded weights are rows of the same deterministic build on every rank.
    ///
    /// # Errors
    /// A collective failed.
    pub fn broadcast_whole<B: AutodiffBackend>(&self, model: CausalLm<B>) -> Result<CausalLm<B>> {
        let skip = model.sharded_params().into_iter().map(|p| p.id).collect();
        Ok(crate::grads::broadcast_params_except(
            model, &self.pg, 0, &skip,
        )?)
    }

    /// Fails with the first collective error met inside a forward or backward pass since the
    /// last check (those passes cannot return errors themselves).
    ///
    /// # Errors
    /// [`Error::ShardedPass`] naming the collective and rank.
    pub fn check(&self) -> Result<()> {
        self.group
            .settle()
            .map_or(Ok(()), |m| Err(Error::ShardedPass(m)))
    }
}

impl Fsdp {
    /// The model as checkpoints and exports need it: whole weights, gathered one tensor at a time
    /// (a collective: every rank must call it; every rank ends up holding the whole model until
    /// the result is dropped). With adapters and nothing trained in full, the trainable
    /// parameters are already whole, so the sharded model is returned as is.
    ///
    /// # Errors
    /// A collective failed.
    pub fn for_saving<B: Backend>(
        &self,
        model: &CausalLm<B>,
        plan: &LoraPlan,
    ) -> Result<CausalLm<B>> {
        let whole = if plan.uses_adapters() && !plan.has_modules_to_save() {
            model.clone()
        } else {
            model.clone().unshard()
        };
        self.check()?;
        Ok(whole)
    }

    /// One line: what this rank holds of the model's parameters, sharded vs whole.
    pub fn summary<B: Backend>(&self, model: &CausalLm<B>) -> String {
        let shapes = model.sharded_params();
        let full: usize = shapes.iter().map(|p| p.shape[0] * p.shape[1]).sum();
        let mine: usize = shapes.iter().map(|p| p.rows.len() * p.shape[1]).sum();
        format!(
            "fsdp: {} weight matrices sharded over {} ranks; rank {} holds {mine} of their {full} elements",
            shapes.len(),
            self.group.world(),
            self.group.rank()
        )
    }
}
