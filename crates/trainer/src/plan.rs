//! `bellows plan`: per-rank memory (weights, adapters, gradients, optimizer state, activations)
//! and communication per step of each data-parallel / sharding strategy, computed from the job file
//! before anything is allocated.

use serde::Serialize;

use bellows_models::ModelArch;
use bellows_peft::{LoraPlan, Method};

use crate::config::{ParamDtype, Precision, RunConfig};

/// Parameter counts of a model under an adapter plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Every parameter (base + adapters).
    pub total: u64,
    /// Frozen base weights of linear layers (what QLoRA quantizes).
    pub frozen_linear: u64,
    /// Other frozen parameters (embeddings, norms, biases, a frozen head).
    pub frozen_other: u64,
    /// Trained parameters (adapters and `modules_to_save`, or everything for a full fine-tune).
    pub trainable: u64,
}

struct Counter<'a> {
    plan: &'a LoraPlan,
    c: ParamCounts,
}

impl Counter<'_> {
    fn add(&mut self, path: &str, n: usize, quantizable: bool) {
        let n = n as u64;
        self.c.total += n;
        if !self.plan.uses_adapters() || self.plan.is_module_to_save(path) {
            self.c.trainable += n;
        } else if quantizable {
            self.c.frozen_linear += n;
        } else {
            self.c.frozen_other += n;
        }
    }

    fn adapter(&mut self, n: usize) {
        self.c.total += n as u64;
        self.c.trainable += n as u64;
    }

    /// A linear layer at `path` (`[d_out, d_in]`), its bias and its adapter; the output head's
    /// weight is never quantized (as in transformers).
    fn linear(&mut self, path: &str, (d_in, d_out): (usize, usize), bias: bool, head: bool) {
        self.add(&format!("{path}.weight"), d_in * d_out, !head);
        if bias {
            self.add(&format!("{path}.bias"), d_out, false);
        }
        if let Some(spec) = self.plan.spec_for(path, head) {
            self.adapter(spec.r * (d_in + d_out));
            if spec.dora {
                self.adapter(d_out);
            }
        }
    }
}

/// Counts the parameters of `arch` with adapters per `plan`, exactly as `CausalLm::new` lays them
/// out (tested against a built model).
pub fn count_params(arch: &ModelArch, plan: &LoraPlan) -> ParamCounts {
    let mut k = Counter {
        plan,
        c: ParamCounts {
            total: 0,
            frozen_linear: 0,
            frozen_other: 0,
            trainable: 0,
        },
    };
    let (d, i, hd) = (arch.hidden_size, arch.intermediate_size, arch.head_dim);
    let (h, kv, b) = (
        arch.num_attention_heads,
        arch.num_key_value_heads,
        arch.attention_bias,
    );
    k.add("model.embed_tokens.weight", arch.vocab_size * d, false);
    for l in 0..arch.num_hidden_layers {
        let a = |n: &str| format!("model.layers.{l}.self_attn.{n}");
        let m = |n: &str| format!("model.layers.{l}.mlp.{n}");
        k.linear(&a("q_proj"), (d, h * hd), b, false);
        k.linear(&a("k_proj"), (d, kv * hd), b, false);
        k.linear(&a("v_proj"), (d, kv * hd), b, false);
        k.linear(&a("o_proj"), (h * hd, d), false, false);
        k.linear(&m("gate_proj"), (d, i), false, false);
        k.linear(&m("up_proj"), (d, i), false, false);
        k.linear(&m("down_proj"), (i, d), false, false);
        k.add(
            &format!("model.layers.{l}.input_layernorm.weight"),
            d,
            false,
        );
        k.add(
            &format!("model.layers.{l}.post_attention_layernorm.weight"),
            d,
            false,
        );
    }
    k.add("model.norm.weight", d, false);
    if !arch.tie_word_embeddings {
        k.linear("lm_head", (d, arch.vocab_size), false, true);
    }
    k.c
}

/// A data-parallel or sharding strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Every rank holds everything; gradients all-reduced.
    Ddp,
    /// ZeRO-1: optimizer state sharded.
    Zero1,
    /// ZeRO-2: optimizer state and gradients sharded (gradients reduce-scattered).
    Zero2,
    /// ZeRO-3 / FSDP: parameters sharded too, all-gathered per layer for forward and backward.
    Fsdp,
    /// FSDP within each node, replicas across nodes (HSDP).
    Hybrid,
}

/// Per-rank memory and traffic of one strategy.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyPlan {
    /// The strategy.
    pub strategy: Strategy,
    /// Base (frozen) weights, bytes per rank.
    pub weights: u64,
    /// Trainable weights (adapters / `modules_to_save` / the whole model), bytes per rank.
    pub trainable: u64,
    /// Gradients, bytes per rank.
    pub gradients: u64,
    /// AdamW moments, bytes per rank.
    pub optimizer: u64,
    /// Activations kept for the backward pass (estimate), bytes per rank.
    pub activations: u64,
    /// The sum of the above.
    pub total: u64,
    /// Bytes each rank sends per optimizer step (ring collectives).
    pub comm_per_step: u64,
}

/// The whole plan: counts, and one row per strategy.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    /// Processes (ranks).
    pub world_size: usize,
    /// Parameter counts.
    pub params: ParamCounts,
    /// Bits per frozen linear parameter as stored (32, 16, or ~4.127 for NF4 + double quant).
    pub base_bits: f64,
    /// One row per strategy.
    pub strategies: Vec<StrategyPlan>,
}

/// Bytes of NF4 storage per parameter with double quantization at block sizes 64 / 256: 4-bit
/// codes, an 8-bit absmax per block and an f32 nested absmax per 256 blocks.
pub const NF4_DQ_BITS: f64 = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0);

/// Activations an autodiff forward keeps per decoder layer and token, in elements of the compute
/// dtype (inputs of the seven projections and norms, q/k/v after RoPE, the SwiGLU inputs), plus the
/// attention probabilities in f32: an estimate, good to a small factor.
fn activation_bytes(arch: &ModelArch, batch: usize, seq: usize, act_bytes: u64) -> u64 {
    let (d, i, hd) = (arch.hidden_size, arch.intermediate_size, arch.head_dim);
    let (h, kv) = (arch.num_attention_heads, arch.num_key_value_heads);
    let per_token = (6 * d + 2 * h * hd + 2 * kv * hd + 4 * i) as u64;
    let tokens = (batch * seq) as u64;
    let scores = (batch * h * seq * seq) as u64 * 2 * 4;
    let layers = arch.num_hidden_layers as u64;
    let logits = tokens * arch.vocab_size as u64 * 4 * 2;
    layers * (tokens * per_token * act_bytes + scores) + logits
}

/// The plan for `cfg` on `world_size` ranks spread evenly over `nodes` nodes (the config's model,
/// adapters, precision, batch). `hybrid` shards within a node, so on one node it equals `fsdp`.
pub fn plan(
    cfg: &RunConfig,
    arch: &ModelArch,
    world_size: usize,
    nodes: usize,
) -> crate::Result<MemoryPlan> {
    let lora = cfg.peft.plan()?;
    let p = count_params(arch, &lora);
    let n = world_size.max(1) as u64;
    let master = if cfg.train.param_dtype == ParamDtype::Bf16 {
        2
    } else {
        4
    };
    let base_bits = match cfg.peft.method {
        Method::Qlora => NF4_DQ_BITS,
        _ => master as f64 * 8.0,
    };
    let act = match cfg.train.precision {
        Precision::F32 => 4,
        _ => 2,
    };
    let base = (p.frozen_linear as f64 * base_bits / 8.0) as u64 + p.frozen_other * master;
    let train = p.trainable * master;
    let grads = p.trainable * master;
    let optim = 2 * p.trainable * master;
    let activations = activation_bytes(arch, cfg.data.batch_size, cfg.data.seq_len, act);
    let ring = |bytes: u64| bytes * (n - 1) / n;
    // Hybrid: `local` ranks per node shard; `m` nodes hold replicas of each shard.
    let m = nodes.clamp(1, world_size.max(1)) as u64;
    let local = (n / m).max(1);
    let ring_in = |bytes: u64| bytes * (local - 1) / local;
    let ring_across = |bytes: u64| bytes * (m - 1) / m;
    let strategies = [
        Strategy::Ddp,
        Strategy::Zero1,
        Strategy::Zero2,
        Strategy::Fsdp,
        Strategy::Hybrid,
    ]
    .into_iter()
    .map(|s| {
        let (w, t, g, o, comm) = match s {
            Strategy::Ddp => (base, train, grads, optim, 2 * ring(grads)),
            Strategy::Zero1 => (base, train, grads, optim / n, 2 * ring(grads) + ring(train)),
            Strategy::Zero2 => (base, train, grads / n, optim / n, ring(grads) + ring(train)),
            Strategy::Fsdp => (
                base / n,
                train / n,
                grads / n,
                optim / n,
                2 * ring(base + train) + ring(grads),
            ),
            Strategy::Hybrid => (
                base / local,
                train / local,
                grads / local,
                optim / local,
                2 * ring_in(base + train) + ring_in(grads) + 2 * ring_across(grads / local),
            ),
        };
        StrategyPlan {
            strategy: s,
            weights: w,
            trainable: t,
            gradients: g,
            optimizer: o,
            activations,
            total: w + t + g + o + activations,
            comm_per_step: comm,
        }
    })
    .collect();
    Ok(MemoryPlan {
        world_size,
        params: p,
        base_bits,
        strategies,
    })
}

/// The architecture a job trains: `model.path`'s `config.json` (no weights read) or `model.init`.
///
/// # Errors
/// The config.json cannot be read or parsed.
pub fn job_arch(cfg: &RunConfig) -> crate::Result<ModelArch> {
    match (&cfg.model.path, &cfg.model.init) {
        (Some(dir), _) => Ok(bellows_models::read_arch(dir)?),
        (None, Some(init)) => Ok(init.arch()),
        (None, None) => Err(crate::Error::Internal(
            "validated config has neither model.path nor model.init".into(),
        )),
    }
}

/// `plan` as a table for a terminal.
pub fn render(p: &MemoryPlan) -> String {
    let mib = |b: u64| format!("{:.1}", b as f64 / (1 << 20) as f64);
    let mut out = format!(
        "parameters: {} total, {} trainable, {} frozen linear ({:.3} bits each), {} other frozen; {} ranks\n",
        p.params.total, p.params.trainable, p.params.frozen_linear, p.base_bits, p.params.frozen_other, p.world_size
    );
    out.push_str("strategy  weights_MiB  trainable_MiB  grads_MiB  optim_MiB  activations_MiB  total_MiB  comm_MiB/step\n");
    for s in &p.strategies {
        out.push_str(&format!(
            "{:<8}  {:>11}  {:>13}  {:>9}  {:>9}  {:>15}  {:>9}  {:>13}\n",
            format!("{:?}", s.strategy).to_lowercase(),
            mib(s.weights),
            mib(s.trainable),
            mib(s.gradients),
            mib(s.optimizer),
            mib(s.activations),
            mib(s.total),
            mib(s.comm_per_step),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bellows_models::{CausalLm, ParamLister, TrainableMapper};
    use bellows_peft::{InitRng, PeftConfig, TargetModules};
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;

    fn arch(tied: bool, bias: bool) -> ModelArch {
        ModelArch {
            tie_word_embeddings: tied,
            attention_bias: bias,
            ..bellows_models::tiny_arch()
        }
    }

    /// The counts equal those of a model actually built with the same plan.
    fn check(arch: &ModelArch, peft: &PeftConfig) {
        let plan = peft.plan().expect("plan");
        let mut m =
            CausalLm::<Autodiff<Flex>>::new(arch, &plan, &mut InitRng::new(0), &Default::default());
        if plan.uses_adapters() {
            m = m.map(&mut TrainableMapper::new(|p: &str| {
                bellows_models::is_adapter_path(p) || plan.is_module_to_save(p)
            }));
        }
        let mut l = ParamLister::default();
        m.visit(&mut l);
        let numel = |p: &bellows_models::ParamInfo| p.shape.iter().product::<usize>() as u64;
        let total: u64 = l.params.iter().map(numel).sum();
        let trainable: u64 = l.params.iter().filter(|p| p.trainable).map(numel).sum();
        let c = count_params(arch, &plan);
        assert_eq!((c.total, c.trainable), (total, trainable), "{peft:?}");
        assert_eq!(c.total, c.trainable + c.frozen_linear + c.frozen_other);
    }

    #[test]
    fn counts_match_built_models() {
        let lora = PeftConfig {
            method: Method::Lora,
            r: 4,
            target_modules: TargetModules::Pattern("all-linear".into()),
            ..PeftConfig::default()
        };
        for a in [arch(false, false), arch(true, true)] {
            check(&a, &PeftConfig::default());
            check(&a, &lora);
            check(
                &a,
                &PeftConfig {
                    use_dora: true,
                    ..lora.clone()
                },
            );
            check(
                &a,
                &PeftConfig {
                    modules_to_save: vec!["lm_head".into()],
                    target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
                    ..lora.clone()
                },
            );
        }
    }

    #[test]
    fn sharding_divides_state_by_the_world_size() {
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs/data/quickstart-train.parquet");
        let text = format!(
            "[model.init]\nvocab_size = 256\nhidden_size = 64\nintermediate_size = 128\n\
             num_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\n\
             [data]\ntrain = {:?}\n",
            data.display().to_string()
        );
        let cfg = RunConfig::from_toml_str(&text, std::path::Path::new("j.toml"), &[])
            .unwrap_or_else(|e| panic!("{e}"));
        let arch = cfg.model.init.as_ref().expect("init").arch();
        let p1 = plan(&cfg, &arch, 1, 1).expect("plan");
        let p4 = plan(&cfg, &arch, 4, 1).expect("plan");
        let p22 = plan(&cfg, &arch, 4, 2).expect("plan");
        let row = |p: &MemoryPlan, s: Strategy| {
            p.strategies
                .iter()
                .find(|r| r.strategy == s)
                .cloned()
                .expect("row")
        };
        // One rank: no traffic, every strategy the same.
        assert!(p1
            .strategies
            .iter()
            .all(|r| r.comm_per_step == 0 && r.total == p1.strategies[0].total));
        let (d, z1, z2, f) = (
            row(&p4, Strategy::Ddp),
            row(&p4, Strategy::Zero1),
            row(&p4, Strategy::Zero2),
            row(&p4, Strategy::Fsdp),
        );
        assert_eq!(z1.optimizer, d.optimizer / 4);
        assert_eq!(z2.gradients, d.gradients / 4);
        assert_eq!(f.trainable, d.trainable / 4);
        assert!(d.total > z1.total && z1.total > z2.total && z2.total > f.total);
        // Full fine-tune, f32: AdamW keeps two moments per parameter.
        assert_eq!(d.optimizer, 2 * 4 * p4.params.trainable);
        // DDP all-reduces the f32 gradients: 2·(N−1)/N of their bytes.
        assert_eq!(d.comm_per_step, 2 * (4 * p4.params.trainable) * 3 / 4);
        // Hybrid on one node is FSDP; on 2 nodes × 2 it shards over 2 and adds the replicas' traffic.
        let h = row(&p4, Strategy::Hybrid);
        assert_eq!((h.total, h.comm_per_step), (f.total, f.comm_per_step));
        let h = row(&p22, Strategy::Hybrid);
        assert_eq!(h.optimizer, d.optimizer / 2);
        assert!(h.total > f.total);
    }
}
