//! FSDP for the whole model: which weights are sharded across ranks and how they come back whole.
//!
//! Sharded (rows of dim 0, [`bellows_peft::shard`]): the dense base weight of every linear layer
//! (q, k, v, o, gate, up, down and an untied `lm_head`) and the token embeddings (also used by a
//! tied head). They hold all but a few thousandths of a Llama's parameters. Kept whole on every
//! rank: RMSNorm gains, biases, adapters (LoRA / DoRA) and NF4 bases; the trainer shards their
//! optimizer state instead (ZeRO).

use bellows_peft::{Linear, ShardGroup};
use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;

use crate::model::CausalLm;

impl<B: Backend> CausalLm<B> {
    /// Keeps only this rank's rows of every sharded weight (see the module docs); parameter ids
    /// and trainability are kept, so optimizer state and checkpoints find them by path.
    pub fn shard(self, group: &ShardGroup) -> Self {
        let mut m = self.map_linears(|l| l.shard(group));
        if m.model.embed_sharding.is_none() {
            let w = m.model.embed_tokens.weight;
            let grad = w.is_require_grad();
            let full = w.val();
            m.model.embed_sharding = Some(group.sharding(full.dims()[0]));
            let mine = group.shard(full).detach();
            m.model.embed_tokens.weight = Param::initialized(w.id, mine).set_require_grad(grad);
        }
        m
    }

    /// Undoes [`CausalLm::shard`], one weight at a time: a collective, every rank must call it.
    pub fn unshard(self) -> Self {
        let mut m = self.map_linears(Linear::unshard);
        if let Some(s) = m.model.embed_sharding.take() {
            let w = m.model.embed_tokens.weight;
            let grad = w.is_require_grad();
            let mine = w.val();
            let full = s.gather(mine.clone().detach(), mine.dtype());
            m.model.embed_tokens.weight = Param::initialized(w.id, full).set_require_grad(grad);
        }
        m
    }

    /// Whether the model is sharded ([`CausalLm::shard`]).
    pub fn is_sharded(&self) -> bool {
        self.model.embed_sharding.is_some()
    }

    /// Parameter id → full shape of every sharded weight (this rank holds rows of them).
    pub fn sharded_shapes(&self) -> Vec<(ParamId, [usize; 2])> {
        let embed = self.model.embed_sharding.as_ref().map(|s| {
            let w = &self.model.embed_tokens.weight;
            (w.id, [s.rows, w.dims()[1]])
        });
        let linears = self
            .linears()
            .filter_map(|l| match (&l.sharding, &l.weight) {
                (Some(_), Some(w)) => Some((w.id, [l.d_out(), l.d_in()])),
                _ => None,
            });
        embed.into_iter().chain(linears).collect()
    }
}
