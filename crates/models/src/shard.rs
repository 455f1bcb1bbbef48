//! FSDP for the whole model: which weights are sharded across ranks and how they come back whole.
//!
//! Sharded (rows of dim 0, [`bellows_peft::shard`]): the dense base weight of every linear layer
//! (q, k, v, o, gate, up, down and an untied `lm_head`) and the token embeddings (also used by a
//! tied head). They hold all but a few thousandths of a Llama's parameters. Kept whole on every
//! rank: RMSNorm gains, biases, adapters (LoRA / DoRA) and NF4 bases; the trainer shards their
//! optimizer state instead (ZeRO).

use std::ops::Range;

use bellows_peft::{InitRng, Linear, ShardGroup};
use burn::module::{Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};

use crate::model::{CausalLm, DecoderLayer};
use crate::source::{BaseSource, LinearShape};
use crate::Result;

/// A [`BaseSource`] that keeps only this rank's rows of what `inner` gives for the sharded
/// weights, one tensor at a time, so building a model for FSDP never holds the whole of it.
/// The rng stream and every value are those of `inner`.
pub struct ShardingSource<'a, B: Backend> {
    /// Where the whole tensors come from.
    pub inner: &'a mut dyn BaseSource<B>,
    /// The ranks the weights are sharded over.
    pub group: &'a ShardGroup,
}

impl<B: Backend> BaseSource<B> for ShardingSource<'_, B> {
    fn linear(
        &mut self,
        path: &str,
        shape: LinearShape,
        quantizable: bool,
        rng: &mut InitRng,
    ) -> Result<Linear<B>> {
        Ok(self
            .inner
            .linear(path, shape, quantizable, rng)?
            .shard(self.group))
    }

    fn embedding(
        &mut self,
        path: &str,
        shape: [usize; 2],
        rng: &mut InitRng,
    ) -> Result<Tensor<B, 2>> {
        Ok(self.group.shard(self.inner.embedding(path, shape, rng)?))
    }

    fn norm(&mut self, path: &str, d: usize) -> Result<Tensor<B, 1>> {
        self.inner.norm(path, d)
    }

    fn shard_group(&self) -> Option<&ShardGroup> {
        Some(self.group)
    }
}

/// One sharded weight of a model: its id, full shape and the rows this rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardedParam {
    /// The parameter.
    pub id: ParamId,
    /// Its full shape.
    pub shape: [usize; 2],
    /// The rows of dim 0 this rank holds.
    pub rows: Range<usize>,
}

impl<B: Backend> CausalLm<B> {
    /// [`CausalLm::build`] from `src`, through a [`ShardingSource`] when `shard` is set.
    ///
    /// # Errors
    /// As [`CausalLm::build`].
    pub fn build_sharded(
        arch: &crate::ModelArch,
        plan: &bellows_peft::LoraPlan,
        src: &mut dyn BaseSource<B>,
        shard: Option<&ShardGroup>,
        rng: &mut InitRng,
    ) -> Result<Self> {
        match shard {
            Some(group) => Self::build(arch, plan, &mut ShardingSource { inner: src, group }, rng),
            None => Self::build(arch, plan, src, rng),
        }
    }

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

    /// FSDP: starts gathering the output head's weight (the embeddings when tied).
    pub(crate) fn prefetch_head(&self) {
        match (&self.lm_head, &self.model.embed_sharding) {
            (Some(head), _) => head.prefetch(),
            (None, Some(s)) => s.prefetch(self.model.embed_tokens.weight.val()),
            (None, None) => {}
        }
    }

    /// NF4 bases (QLoRA): packed bytes this rank holds and the whole model's.
    pub fn sharded_nf4_bytes(&self) -> (usize, usize) {
        self.linears()
            .filter_map(|l| Some((l.nf4.as_ref()?, l.sharding.as_ref()?)))
            .map(|(q, s)| (q.packed.dims()[0], s.rows * q.d_in / 2))
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    /// Takes part in [`CausalLm::unshard`] without keeping the result: the other ranks' gathers
    /// complete, this rank's model stays sharded and no whole weight outlives its gather.
    pub fn unshard_elsewhere(&self) {
        for l in self.linears() {
            drop(l.clone().unshard());
        }
        if let Some(s) = &self.model.embed_sharding {
            let w = self.model.embed_tokens.weight.val();
            drop(s.gather(w.clone().detach(), w.dtype()));
        }
    }

    /// Whether the model is sharded ([`CausalLm::shard`]).
    pub fn is_sharded(&self) -> bool {
        self.model.embed_sharding.is_some()
    }

    /// Every sharded weight: id, full shape and this rank's rows.
    pub fn sharded_params(&self) -> Vec<ShardedParam> {
        let embed = self.model.embed_sharding.as_ref().map(|s| {
            let w = &self.model.embed_tokens.weight;
            ShardedParam {
                id: w.id,
                shape: [s.rows, w.dims()[1]],
                rows: s.my_rows(),
            }
        });
        let linears = self
            .linears()
            .filter_map(|l| match (&l.sharding, &l.weight) {
                (Some(s), Some(w)) => Some(ShardedParam {
                    id: w.id,
                    shape: [l.d_out(), l.d_in()],
                    rows: s.my_rows(),
                }),
                _ => None,
            });
        embed.into_iter().chain(linears).collect()
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// FSDP: starts gathering this layer's sharded weights, in the order the layer uses them.
    pub fn prefetch(&self) {
        for l in self.linears() {
            l.prefetch();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bellows_peft::{Collective, InitRng, ShardGroup};
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Int, Tensor, TensorData};

    use crate::{tiny_arch, CausalLm, ForwardInput};

    /// One rank: every collective is the identity.
    struct Alone;

    impl Collective for Alone {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            1
        }
        fn all_gather(&self, mine: &[f32], all: &mut [f32]) -> Result<(), String> {
            all.copy_from_slice(mine);
            Ok(())
        }
        fn reduce_scatter_sum(&self, all: &[f32], mine: &mut [f32]) -> Result<(), String> {
            mine.copy_from_slice(all);
            Ok(())
        }
        fn all_gather_bytes(&self, mine: &[u8], all: &mut [u8]) -> Result<(), String> {
            all.copy_from_slice(mine);
            Ok(())
        }
    }

    type B = Autodiff<Flex>;

    fn logits(m: &CausalLm<B>) -> Vec<f32> {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![1i64, 5, 9, 2], [1, 4]),
            &Default::default(),
        );
        let positions = [0u32, 1, 2, 3];
        let input = ForwardInput {
            positions: &positions,
            segments: None,
            compute: None,
        };
        m.forward(ids, &input)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32")
    }

    #[test]
    fn a_model_sharded_after_building_computes_what_it_did_and_unshards_back() {
        let arch = tiny_arch();
        let plan = bellows_peft::PeftConfig::default().plan().expect("plan");
        let m = CausalLm::<B>::new(&arch, &plan, &mut InitRng::new(3), &Default::default());
        let before = logits(&m);
        let group = ShardGroup::new(Arc::new(Alone));
        let sharded = m.shard(&group);
        assert!(sharded.is_sharded());
        // Embeddings, 7 matrices per layer and the untied head.
        let expected = 1 + 7 * arch.num_hidden_layers + usize::from(!arch.tie_word_embeddings);
        assert_eq!(sharded.sharded_params().len(), expected);
        assert_eq!(logits(&sharded), before);
        let back = sharded.unshard();
        assert!(!back.is_sharded());
        assert_eq!(logits(&back), before);
    }
}
