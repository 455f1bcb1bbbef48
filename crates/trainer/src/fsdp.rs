//! `dist.strategy = "fsdp"` (ZeRO stage 3): the model's weight matrices are sharded by rows across
//! ranks ([`bellows_models::CausalLm::shard`]), gathered per layer for each use and reduce-scattered
//! in the backward pass; the remaining small parameters (norms, biases, adapters) stay whole and
//! ZeRO-2 shards their optimizer state and gradients. One [`ZeroAdamW`] updates both.

use std::sync::Arc;

use bellows_dist::{ProcessGroup, ReduceOp};
use bellows_models::CausalLm;
use bellows_peft::shard::shard_rows;
use bellows_peft::{Collective, LoraPlan, ShardGroup};
use burn::tensor::backend::Backend;

use crate::error::Error;
use crate::zero::ZeroAdamW;
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
}

impl Fsdp {
    /// FSDP over `pg`.
    pub fn new(pg: Arc<ProcessGroup>) -> Self {
        Fsdp {
            group: ShardGroup::new(Arc::new(GroupCollective(pg))),
        }
    }

    /// Shards `model` and returns it with the optimizer that updates its shards in place.
    pub fn shard<B: Backend>(
        &self,
        model: CausalLm<B>,
        zero: ZeroAdamW,
    ) -> (CausalLm<B>, ZeroAdamW) {
        let model = model.shard(&self.group);
        let shapes = model
            .sharded_shapes()
            .into_iter()
            .map(|(id, s)| (id, s.to_vec()));
        let zero = zero.with_presharded(shapes);
        (model, zero)
    }

    /// Fails with the first collective error met inside a forward or backward pass since the
    /// last check (those passes cannot return errors themselves).
    ///
    /// # Errors
    /// [`Error::ShardedPass`] naming the collective and rank.
    pub fn check(&self) -> Result<()> {
        self.group
            .take_error()
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
        let shapes = model.sharded_shapes();
        let full: usize = shapes.iter().map(|(_, s)| s[0] * s[1]).sum();
        let mine: usize = shapes
            .iter()
            .map(|(_, s)| shard_rows(s[0], self.group.world(), self.group.rank()).len() * s[1])
            .sum();
        format!(
            "fsdp: {} weight matrices sharded over {} ranks; rank {} holds {mine} of their {full} elements",
            shapes.len(),
            self.group.world(),
            self.group.rank()
        )
    }
}
