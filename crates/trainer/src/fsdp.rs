//! `dist.strategy = "fsdp"` (ZeRO stage 3): the model's weight matrices are sharded by rows across
//! ranks ([`bellows_models::CausalLm::shard`]), gathered per layer for each use and reduce-scattered
//! in the backward pass; the remaining small parameters (norms, biases, adapters) stay whole and
//! ZeRO-2 shards their optimizer state and gradients. One [`crate::zero::ZeroAdamW`] updates both.
//!
//! `dist.strategy = "hybrid"` (HSDP): the same within each node — the shard group is the node's
//! ranks — while the nodes hold replicas: every gradient reduce-scattered inside a node is then
//! all-reduced between the ranks that hold the same shard on the other nodes.

use std::sync::Arc;

use bellows_dist::{HybridMesh, NodePlacement, ProcessGroup, ReduceOp};
use bellows_models::CausalLm;
use bellows_peft::{Collective, LoraPlan, ShardGroup};
use burn::module::ParamId;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::error::Error;
use crate::zero::{AdamWParams, ZeroAdamW};
use crate::Result;

/// [`Collective`] over the shard group, with the replicas' all-reduce after each reduce-scatter.
struct GroupCollective {
    shard: Arc<ProcessGroup>,
    replica: Option<Arc<ProcessGroup>>,
}

impl Collective for GroupCollective {
    fn rank(&self) -> usize {
        self.shard.rank()
    }
    fn world(&self) -> usize {
        self.shard.world_size()
    }
    fn all_gather(&self, mine: &[f32], all: &mut [f32]) -> std::result::Result<(), String> {
        self.shard.all_gather(mine, all).map_err(|e| e.to_string())
    }
    fn all_gather_bytes(&self, mine: &[u8], all: &mut [u8]) -> std::result::Result<(), String> {
        self.shard.all_gather(mine, all).map_err(|e| e.to_string())
    }
    fn reduce_scatter_sum(&self, all: &[f32], mine: &mut [f32]) -> std::result::Result<(), String> {
        self.shard
            .reduce_scatter(all, mine, ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        match &self.replica {
            Some(r) => r.all_reduce(mine, ReduceOp::Sum).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// The FSDP state of one rank: the group its sharded weights gather over and, for hybrid
/// sharding, the group of its replicas on the other nodes.
#[derive(Debug, Clone)]
pub struct Fsdp {
    group: ShardGroup,
    pg: Arc<ProcessGroup>,
    shard_pg: Arc<ProcessGroup>,
    replica: Option<Arc<ProcessGroup>>,
}

impl Fsdp {
    /// FSDP over `pg`; with `prefetch`, collectives run on a communication thread that gathers
    /// the next layer while the current one computes.
    ///
    /// # Errors
    /// The communication thread cannot be started.
    pub fn new(pg: Arc<ProcessGroup>, prefetch: bool) -> Result<Self> {
        Self::build(pg.clone(), pg, None, prefetch)
    }

    /// Hybrid sharding: weights sharded over the ranks of each node (placed as `at` says),
    /// replicated across nodes.
    ///
    /// # Errors
    /// The nodes do not all run the same number of ranks (named on every rank), a collective
    /// fails, or the communication thread cannot be started.
    pub fn hybrid(pg: Arc<ProcessGroup>, at: NodePlacement, prefetch: bool) -> Result<Self> {
        let mesh = HybridMesh::new(&pg, at)?;
        let replica = (mesh.replicate.world_size() > 1).then(|| Arc::new(mesh.replicate));
        Self::build(pg, Arc::new(mesh.shard), replica, prefetch)
    }

    fn build(
        pg: Arc<ProcessGroup>,
        shard_pg: Arc<ProcessGroup>,
        replica: Option<Arc<ProcessGroup>>,
        prefetch: bool,
    ) -> Result<Self> {
        let comm: Arc<dyn Collective> = Arc::new(GroupCollective {
            shard: shard_pg.clone(),
            replica: replica.clone(),
        });
        let group = if prefetch {
            ShardGroup::with_prefetch(comm).map_err(|e| {
                Error::Internal(format!("fsdp: cannot start the communication thread: {e}"))
            })?
        } else {
            ShardGroup::new(comm)
        };
        Ok(Fsdp {
            group,
            pg,
            shard_pg,
            replica,
        })
    }

    /// The ranks the weights are sharded over (the node's under hybrid sharding, else all).
    pub fn shard_group(&self) -> &ProcessGroup {
        &self.shard_pg
    }

    /// The optimizer for `model`: ZeRO over the shard group, updating the sharded weights in
    /// place, all-reducing between replicas under hybrid sharding.
    pub fn optimizer<B: Backend>(&self, hp: AdamWParams, model: &CausalLm<B>) -> ZeroAdamW {
        let (rank, world) = (self.shard_pg.rank(), self.shard_pg.world_size());
        ZeroAdamW::new(hp, true, rank, world)
            .with_presharded(Self::presharded(model))
            .with_replicas(self.replica.clone())
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
    /// The model as the final export needs it: whole weights on the main rank, gathered one
    /// tensor at a time (a collective: every rank must call it; the other ranks take part and
    /// keep their shards). With adapters and nothing trained in full, the trainable parameters
    /// are already whole, so the sharded model is returned as is.
    ///
    /// # Errors
    /// A collective failed.
    pub fn for_saving<B: Backend>(
        &self,
        model: CausalLm<B>,
        plan: &LoraPlan,
        main: bool,
    ) -> Result<CausalLm<B>> {
        let whole = if plan.uses_adapters() && !plan.has_modules_to_save() {
            model
        } else if main {
            model.unshard()
        } else {
            model.unshard_elsewhere();
            model
        };
        self.check()?;
        Ok(whole)
    }

    /// One line: what this rank holds of the model's parameters, sharded vs whole.
    pub fn summary<B: Backend>(&self, model: &CausalLm<B>) -> String {
        let shapes = model.sharded_params();
        let full: usize = shapes.iter().map(|p| p.shape[0] * p.shape[1]).sum();
        let mine: usize = shapes.iter().map(|p| p.rows.len() * p.shape[1]).sum();
        let (nf4_mine, nf4_full) = model.sharded_nf4_bytes();
        let nf4 = if nf4_full > 0 {
            format!("; NF4 bases: {nf4_mine} of {nf4_full} packed bytes")
        } else {
            String::new()
        };
        format!(
            "fsdp: {} weight matrices sharded over {} ranks; rank {} holds {mine} of their {full} elements{nf4}",
            shapes.len(),
            self.group.world(),
            self.group.rank()
        )
    }
}
