//! `bellows bench`: training-step throughput on shapes shared with the PyTorch + PEFT peer script
//! (`benches/peer/torch_lora_bench.py`), so the two can be run back to back and compared as a ratio.

use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsParams, Optimizer};

use crate::adamw::FusedAdamW;
use crate::zero::AdamWParams;
use burn::tensor::{backend::AutodiffBackend, ElementConversion};
use serde::Serialize;

use bellows_data::{Batch, LoaderState, Shard, Split};
use bellows_models::{is_adapter_path, CausalLm, Family, ModelArch, TrainableMapper};
use bellows_peft::{InitRng, LoraInit, Method, PeftConfig, TargetModules};

use crate::config::Precision;
use crate::precision::compute_dtype;
use crate::recipe::batch_loss;

/// Which workload to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    /// LoRA r16 α32 on every linear layer but the head, of the small Llama.
    Lora,
    /// [`BenchMode::Lora`] on an NF4-quantized base (QLoRA: block 64, double quantization).
    Qlora,
    /// Full fine-tuning of the small Llama.
    Full,
    /// LoRA on a tiny Llama (overhead-bound).
    Tiny,
    /// Inference forward passes (no autodiff) of the small Llama: the `eval` / prefill path.
    Forward,
    /// LoRA r16 on a ~1.1B-parameter Llama (TinyLlama-1.1B's shape; GPU check).
    Lora1b,
}

impl BenchMode {
    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Lora => "lora",
            BenchMode::Qlora => "qlora",
            BenchMode::Full => "full",
            BenchMode::Tiny => "tiny",
            BenchMode::Forward => "forward",
            BenchMode::Lora1b => "lora-1b",
        }
    }
}

/// What to benchmark and how.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// The workload.
    pub mode: BenchMode,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Compute precision (f32 master weights either way).
    pub precision: Precision,
    /// Batch size (default: the mode's).
    pub batch: Option<usize>,
    /// Sequence length (default: the mode's).
    pub seq: Option<usize>,
    /// The device's measured peak in TFLOP/s, for the MFU (model FLOP utilisation) figure.
    pub peak_tflops: Option<f64>,
}

/// One benchmark result (printed as a JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `"lora"`, `"full"`, `"tiny"`, `"forward"` or `"lora-1b"`.
    pub mode: &'static str,
    /// `"f32"`, `"bf16"` or `"fp16"`.
    pub precision: String,
    /// Batch size and sequence length.
    pub batch_seq: (usize, usize),
    /// Model FLOP utilisation against `peak_tflops`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Timed tokens per second (all timed steps).
    pub tokens_per_sec: f64,
    /// Tokens per second of the fastest step.
    pub tokens_per_sec_best: f64,
    /// Model FLOP/s in GFLOP/s by the peer script's formula.
    pub model_gflops_per_sec: f64,
    /// Mean step time in seconds.
    pub step_secs_mean: f64,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Bits per parameter of the quantized base linears (QLoRA only: codes, scales, code books).
    pub base_bits_per_param: Option<f64>,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Matmul parameters N of the FLOP formula.
    pub matmul_params: usize,
    /// Loss of the first and the last step.
    pub loss_first_last: (f64, f64),
    /// Threads of the compute pool.
    pub threads: usize,
    /// 1-minute load average at start and end (from /proc/loadavg).
    pub load_start_end: (f64, f64),
}

fn small() -> ModelArch {
    ModelArch {
        family: Family::Llama,
        vocab_size: 8192,
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        attention_bias: false,
        initializer_range: 0.02,
        bos_token_id: None,
        eos_token_id: None,
        sliding_window: None,
    }
}

/// TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 heads over 4 kv heads, vocab 32000.
fn llama_1b() -> ModelArch {
    ModelArch {
        vocab_size: 32000,
        hidden_size: 2048,
        intermediate_size: 5632,
        num_hidden_layers: 22,
        num_attention_heads: 32,
        num_key_value_heads: 4,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        ..small()
    }
}

fn tiny() -> ModelArch {
    ModelArch {
        vocab_size: 128,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        ..small()
    }
}

/// The peak resident set size of this process in MiB (Linux `VmHWM`), 0 where unavailable.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// A batch of random tokens (fixed seed), every position a label.
fn random_batch(vocab: usize, batch: usize, seq: usize, seed: u64) -> Batch {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect();
    Batch {
        batch_size: batch,
        seq_len: seq,
        labels: ids.iter().map(|&t| i64::from(t)).collect(),
        input_ids: ids,
        position_ids: (0..batch).flat_map(|_| 0..seq as u32).collect(),
        segment_ids: vec![1; batch * seq],
        state_after: LoaderState {
            split: Split::Train,
            shard: Shard { rank: 0, world: 1 },
            num_chunks: 0,
            epoch: 0,
            batches_in_epoch: 0,
            chunk_pos: 0,
            row_in_chunk: 0,
            rng_word_pos: 0,
            buffer: Vec::new(),
            carry: None,
            finished: false,
            pending: Vec::new(),
            remainder: None,
        },
    }
}

/// Runs `warmup` untimed and `steps` timed training steps (forward, loss, backward, AdamW).
pub fn run_bench<B: AutodiffBackend>(spec: &BenchSpec, device: &B::Device) -> BenchReport {
    let (mode, warmup, steps) = (spec.mode, spec.warmup, spec.steps.max(1));
    let compute = compute_dtype(spec.precision);
    let load_start = load_avg();
    let (arch, batch, seq) = match mode {
        BenchMode::Tiny => (tiny(), 2, 32),
        BenchMode::Lora1b => (llama_1b(), 4, 1024),
        _ => (small(), 4, 256),
    };
    let (batch, seq) = (spec.batch.unwrap_or(batch), spec.seq.unwrap_or(seq));
    let lora = matches!(
        mode,
        BenchMode::Lora | BenchMode::Qlora | BenchMode::Tiny | BenchMode::Lora1b
    );
    let peft = PeftConfig {
        method: match mode {
            BenchMode::Qlora => Method::Qlora,
            _ if lora => Method::Lora,
            _ => Method::None,
        },
        r: 16,
        alpha: 32.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        init: LoraInit::Gaussian,
        ..PeftConfig::default()
    };
    let plan = peft.plan().expect("the bench's LoRA config is valid");
    let mut rng = InitRng::new(0);
    let mut model = match peft.quant_config() {
        Some(q) => CausalLm::<B>::new_quantized(&arch, &plan, q.options(), &mut rng, device),
        None => CausalLm::<B>::new(&arch, &plan, &mut rng, device),
    };
    let base_bits_per_param = model.is_quantized().then(|| {
        let q: Vec<_> = model.linears().filter_map(|l| l.nf4.as_ref()).collect();
        let bytes: usize = q.iter().map(|w| w.storage_bytes()).sum();
        let params: usize = q.iter().map(|w| w.d_in * w.d_out).sum();
        8.0 * bytes as f64 / params as f64
    });
    if lora {
        model = model.map(&mut TrainableMapper::new(is_adapter_path));
    }
    let lister = {
        let mut l = bellows_models::ParamLister::default();
        model.visit(&mut l);
        l
    };
    let trainable: usize = lister
        .params
        .iter()
        .filter(|p| p.trainable)
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let matmul: usize = lister
        .params
        .iter()
        .filter(|p| p.path.ends_with("_proj.weight") || p.path == "lm_head.weight")
        .map(|p| p.shape.iter().product::<usize>())
        .sum::<usize>()
        + model
            .linears()
            .filter_map(|l| l.nf4.as_ref())
            .map(|w| w.d_in * w.d_out)
            .sum::<usize>();
    let mut optim = FusedAdamW::new(AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    })
    .init::<B, CausalLm<B>>();
    let data = random_batch(arch.vocab_size, batch, seq, 0);
    let tokens = (batch * seq) as f64;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    if mode == BenchMode::Forward {
        let inner = model.valid();
        for i in 0..warmup + steps {
            let t = Instant::now();
            crate::keep_warm();
            let (sum, count) = batch_loss(&inner, &data, device, compute);
            losses.push(sum.into_scalar().elem::<f64>() / count as f64);
            if i >= warmup {
                times.push(t.elapsed().as_secs_f64());
            }
        }
    }
    for i in 0..if mode == BenchMode::Forward {
        0
    } else {
        warmup + steps
    } {
        let t = Instant::now();
        crate::keep_warm();
        let (sum, count) = batch_loss(&model, &data, device, compute);
        let loss = sum.div_scalar(count as f64);
        losses.push(loss.clone().into_scalar().elem::<f64>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model, grads);
        B::sync(device).ok();
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    if let Some(products) = bellows_peft::fused::product_stats::report() {
        eprint!("{products}");
    }
    let total: f64 = times.iter().sum::<f64>().max(1e-12);
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let flops_per_token = match mode {
        BenchMode::Forward => 2 * matmul,
        _ if lora => 4 * matmul + 6 * trainable,
        _ => 6 * matmul,
    } as f64;
    let tps = tokens * times.len() as f64 / total;
    let gflops = flops_per_token * tps / 1e9;
    BenchReport {
        mode: mode.name(),
        precision: format!("{:?}", spec.precision).to_lowercase(),
        batch_seq: (batch, seq),
        mfu: spec.peak_tflops.map(|p| gflops / (p * 1e3)),
        tokens_per_sec: tps,
        tokens_per_sec_best: tokens / best,
        model_gflops_per_sec: gflops,
        step_secs_mean: total / times.len().max(1) as f64,
        peak_rss_mib: peak_rss_mib(),
        base_bits_per_param,
        trainable_params: trainable,
        matmul_params: matmul,
        loss_first_last: (
            losses.first().copied().unwrap_or(f64::NAN),
            losses.last().copied().unwrap_or(f64::NAN),
        ),
        threads: rayon::current_num_threads(),
        load_start_end: (load_start, load_avg()),
    }
}
