//! The Llama-family causal language model, with Hugging Face parameter paths
//! (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ..., `lm_head.weight`).

use bellows_peft::shard::{sharded_embedding, sharded_matmul_t};
use bellows_peft::{in_dtype, InitRng, Linear, LoraPlan, Nf4Options, ShardGroup, Sharding};
use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::{backend::Backend, Bool, DType, Int, Tensor, TensorData};

use crate::attention::Attention;
use crate::cache::KvCache;
use crate::config::ModelArch;
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::rope::{inv_freq, RopeTables};
use crate::source::{BaseSource, RandomInit};

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention.
    pub self_attn: Attention<B>,
    /// Feed-forward.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// The seven linear layers: q, k, v, o, gate, up, down.
    pub fn linears(&self) -> [&Linear<B>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// Applies `f` to each of the seven linear layers.
    pub fn map_linears(self, f: impl Fn(Linear<B>) -> Linear<B>) -> Self {
        let DecoderLayer {
            self_attn: a,
            mlp: m,
            input_layernorm,
            post_attention_layernorm,
        } = self;
        DecoderLayer {
            self_attn: Attention {
                q_proj: f(a.q_proj),
                k_proj: f(a.k_proj),
                v_proj: f(a.v_proj),
                o_proj: f(a.o_proj),
                ..a
            },
            mlp: Mlp {
                gate_proj: f(m.gate_proj),
                up_proj: f(m.up_proj),
                down_proj: f(m.down_proj),
            },
            input_layernorm,
            post_attention_layernorm,
        }
    }
}

/// The decoder stack without the output head (HF `LlamaModel`).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// Token embeddings `[vocab, hidden]`.
    pub embed_tokens: Embedding<B>,
    /// The layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// FSDP: `embed_tokens.weight` holds only this rank's rows ([`CausalLm::shard`]).
    #[module(skip)]
    pub embed_sharding: Option<Sharding>,
}

/// A Llama-family causal LM (HF `LlamaForCausalLM` and relatives).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// The decoder.
    pub model: Decoder<B>,
    /// The output head `[vocab, hidden]`; `None` when tied to the embeddings.
    pub lm_head: Option<Linear<B>>,
    /// RoPE inverse frequencies (derived from the architecture; not a parameter).
    pub inv_freq: Vec<f32>,
}

/// What the forward pass needs besides token ids.
#[derive(Debug, Clone)]
pub struct ForwardInput<'a> {
    /// Positions, row-major `[batch, seq]` (restart per packed document).
    pub positions: &'a [u32],
    /// Segment ids `[batch, seq]` for packed rows; `None` means one sequence per row.
    pub segments: Option<&'a [u32]>,
    /// Mixed precision: the dtype of the matmuls (`Some(BF16)` / `Some(F16)`), with the residual
    /// stream, norms, softmax and logits kept in the weights' dtype / f32 (PyTorch autocast's
    /// split). `None` computes everything in the weights' dtype.
    pub compute: Option<DType>,
}

impl<B: Backend> CausalLm<B> {
    /// A randomly initialised model (HF init: N(0, initializer_range²), unit norms),
    /// with LoRA adapters where `plan` says. All values come from `rng`, so the same seed gives
    /// the same model on every rank and backend.
    pub fn new(arch: &ModelArch, plan: &LoraPlan, rng: &mut InitRng, device: &B::Device) -> Self {
        let mut src = RandomInit {
            std: arch.initializer_range,
            quantize: None,
            device,
        };
        Self::build(arch, plan, &mut src, rng).expect("the random init cannot fail")
    }

    /// A randomly initialised model as [`CausalLm::new`] / [`CausalLm::new_quantized`] draw it,
    /// built for FSDP when `shard` is set: each sharded weight keeps only this rank's rows as
    /// soon as it is drawn ([`crate::ShardingSource`]).
    pub fn new_sharded(
        arch: &ModelArch,
        plan: &LoraPlan,
        quantize: Option<Nf4Options>,
        shard: Option<&ShardGroup>,
        rng: &mut InitRng,
        device: &B::Device,
    ) -> Self {
        let mut src = RandomInit {
            std: arch.initializer_range,
            quantize,
            device,
        };
        let built = Self::build_sharded(arch, plan, &mut src, shard, rng);
        built.expect("the random init cannot fail")
    }

    /// [`CausalLm::new`] with every decoder linear NF4-quantized as soon as it is drawn (QLoRA on a
    /// random base); embeddings, norms, `lm_head` and `modules_to_save` stay dense. The rng stream
    /// is the same as [`CausalLm::new`]'s.
    pub fn new_quantized(
        arch: &ModelArch,
        plan: &LoraPlan,
        quantize: Nf4Options,
        rng: &mut InitRng,
        device: &B::Device,
    ) -> Self {
        let mut src = RandomInit {
            std: arch.initializer_range,
            quantize: Some(quantize),
            device,
        };
        Self::build(arch, plan, &mut src, rng).expect("the random init cannot fail")
    }

    /// A model whose base parameters come from `src`, each created once and in module order
    /// (embedding, then per layer q, k, v, o, gate, up, down, then `lm_head`); adapters where
    /// `plan` says, initialised from `rng` right after their layer.
    ///
    /// # Errors
    /// `src` cannot provide a parameter (missing, mis-shaped or unreadable tensor).
    pub fn build(
        arch: &ModelArch,
        plan: &LoraPlan,
        src: &mut dyn BaseSource<B>,
        rng: &mut InitRng,
    ) -> crate::Result<Self> {
        let embed_tokens = Embedding {
            weight: Param::from_tensor(src.embedding(
                "model.embed_tokens.weight",
                [arch.vocab_size, arch.hidden_size],
                rng,
            )?),
        };
        let norm = |src: &mut dyn BaseSource<B>, path: String| -> crate::Result<RmsNorm<B>> {
            Ok(RmsNorm {
                weight: Param::from_tensor(src.norm(&path, arch.hidden_size)?),
                eps: arch.rms_norm_eps,
            })
        };
        let mut layers = Vec::with_capacity(arch.num_hidden_layers);
        for i in 0..arch.num_hidden_layers {
            let p = |n: &str| format!("model.layers.{i}.{n}.weight");
            layers.push(DecoderLayer {
                self_attn: Attention::build(arch, plan, i, src, rng)?,
                mlp: Mlp::build(arch, plan, i, src, rng)?,
                input_layernorm: norm(src, p("input_layernorm"))?,
                post_attention_layernorm: norm(src, p("post_attention_layernorm"))?,
            });
        }
        let lm_head = if arch.tie_word_embeddings {
            None
        } else {
            let shape = (arch.hidden_size, arch.vocab_size, false);
            let head = src.linear("lm_head", shape, false, rng)?;
            Some(match plan.spec_for("lm_head", true) {
                Some(spec) => head.with_lora(&spec, rng),
                None => head,
            })
        };
        Ok(CausalLm {
            model: Decoder {
                embed_tokens,
                layers,
                norm: norm(src, "model.norm.weight".into())?,
                embed_sharding: src.shard_group().map(|g| g.sharding(arch.vocab_size)),
            },
            lm_head,
            inv_freq: inv_freq(arch),
        })
    }

    /// Logits `[batch, seq, vocab]` for `input_ids: [batch, seq]`.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>, input: &ForwardInput<'_>) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let mask = attention_mask::<B>(input.segments, b, s, &device);
        let hidden = self.hidden(input_ids, input.positions, Some(&mask), None, input.compute);
        self.head(hidden, input.compute)
    }

    /// Logits for the new tokens of a generation step; `cache` holds earlier positions.
    /// `input_ids` is `[1, n]`; positions continue from `cache.len()`.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let start = cache.len();
        let device = input_ids.device();
        let positions: Vec<u32> = (0..b)
            .flat_map(|_| (start..start + s).map(|p| p as u32))
            .collect();
        let mask = (s > 1).then(|| prefix_causal_mask::<B>(b, s, start, &device));
        let hidden = self.hidden(input_ids, &positions, mask.as_ref(), Some(cache), None);
        self.head(hidden, None)
    }

    fn hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        positions: &[u32],
        mask: Option<&Tensor<B, 4, Bool>>,
        mut cache: Option<&mut KvCache<B>>,
        compute: Option<DType>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let rope = RopeTables::<B>::new(&self.inv_freq, positions, b, s, &device);
        let mut x = match &self.model.embed_sharding {
            Some(sh) => sharded_embedding(self.model.embed_tokens.weight.val(), input_ids, sh),
            None => self.model.embed_tokens.forward(input_ids),
        };
        // The residual stream keeps the embedding's dtype; blocks compute in `cd`.
        let (rd, cd) = (x.dtype(), compute.unwrap_or(x.dtype()));
        for (i, layer) in self.model.layers.iter().enumerate() {
            // FSDP with prefetching: this layer's gathers (unless already running), then the
            // next layer's (or the head's), run while this layer computes.
            layer.prefetch();
            match self.model.layers.get(i + 1) {
                Some(next) => next.prefetch(),
                None => self.prefetch_head(),
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = layer.self_attn.forward(
                in_dtype(layer.input_layernorm.forward(x.clone()), cd),
                &rope,
                mask,
                layer_cache,
            );
            x = x + in_dtype(h, rd);
            let h = layer.mlp.forward(in_dtype(
                layer.post_attention_layernorm.forward(x.clone()),
                cd,
            ));
            x = x + in_dtype(h, rd);
        }
        self.model.norm.forward(x)
    }

    fn head(&self, hidden: Tensor<B, 3>, compute: Option<DType>) -> Tensor<B, 3> {
        let hidden = match compute {
            Some(cd) => in_dtype(hidden, cd),
            None => hidden,
        };
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, d] = hidden.dims();
                let w = self.model.embed_tokens.weight.val();
                let x = hidden.reshape([b * s, d]);
                let (y, v) = match &self.model.embed_sharding {
                    Some(sh) => (sharded_matmul_t(x, w, sh), sh.rows),
                    None => {
                        let w = in_dtype(w, x.dtype());
                        let v = w.dims()[0];
                        (x.matmul(w.transpose()), v)
                    }
                };
                y.reshape([b, s, v])
            }
        }
    }

    /// Every linear layer: the seven per decoder layer, then `lm_head`.
    pub fn linears(&self) -> impl Iterator<Item = &Linear<B>> {
        self.model
            .layers
            .iter()
            .flat_map(DecoderLayer::linears)
            .chain(self.lm_head.as_ref())
    }

    /// Whether any linear layer has an NF4-quantized base (QLoRA).
    pub fn is_quantized(&self) -> bool {
        self.linears().any(Linear::is_quantized)
    }

    /// Applies `f` to every linear layer (the seven per decoder layer, then `lm_head`).
    pub fn map_linears(self, f: impl Fn(Linear<B>) -> Linear<B>) -> Self {
        let mut m = self;
        m.model.layers = m
            .model
            .layers
            .into_iter()
            .map(|l| l.map_linears(&f))
            .collect();
        m.lm_head = m.lm_head.map(&f);
        m
    }

    /// Folds every adapter into its base weight and drops it (PEFT's `merge_and_unload`); DoRA
    /// layers become `(m/‖W + s·B·A‖)·(W + s·B·A)`.
    pub fn merge_adapters(self) -> Self {
        self.map_linears(Linear::merge)
    }

    /// Folds every adapter into its base weight but keeps it (PEFT's `merge_adapter`), so
    /// [`CausalLm::unmerge_adapters`] can restore the base.
    pub fn merge_adapters_in_place(self) -> Self {
        self.map_linears(Linear::merge_in_place)
    }

    /// Undoes [`CausalLm::merge_adapters_in_place`] (PEFT's `unmerge_adapter`).
    pub fn unmerge_adapters(self) -> Self {
        self.map_linears(Linear::unmerge)
    }

    /// Sets every DoRA magnitude to the row norms of its (new) base weight, as PEFT initialises
    /// them; loaders call it after reading base weights.
    pub fn init_dora_magnitudes(self) -> Self {
        self.map_linears(Linear::init_dora_magnitude)
    }

    /// Replaces the embedding weight (used by loaders); keeps the parameter id.
    pub fn set_embedding(&mut self, w: Tensor<B, 2>) {
        let id = self.model.embed_tokens.weight.id;
        self.model.embed_tokens.weight = Param::initialized(id, w);
    }
}

/// `[batch, 1, seq, seq]`, true where query `i` must not see key `j`: `j > i`, or (with
/// segments) a different document, so packed documents never attend to each other.
pub fn attention_mask<B: Backend>(
    segments: Option<&[u32]>,
    b: usize,
    s: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let mut m = vec![false; b * s * s];
    for r in 0..b {
        for i in 0..s {
            for j in 0..s {
                let cross = segments.is_some_and(|seg| seg[r * s + i] != seg[r * s + j]);
                m[(r * s + i) * s + j] = j > i || cross;
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [b, 1, s, s]), device)
}

/// Causal mask for `s` new queries after `past` cached keys: `[batch, 1, s, past + s]`.
fn prefix_causal_mask<B: Backend>(
    b: usize,
    s: usize,
    past: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let t = past + s;
    let mut m = vec![false; b * s * t];
    for r in 0..b {
        for i in 0..s {
            for j in 0..t {
                m[(r * s + i) * t + j] = j > past + i;
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [b, 1, s, t]), device)
}
