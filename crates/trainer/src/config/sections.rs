//! The sections of a job file owned by the trainer: `[run]`, `[model]`, `[optim]`, `[train]`,
//! `[checkpoint]`, `[logging]`. Every default lives in one function and is stated in the field doc.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

fn default_output_dir() -> PathBuf {
    PathBuf::from("runs/default")
}
fn default_seed() -> u64 {
    42
}
fn default_max_steps() -> u64 {
    100
}
fn default_log_every() -> u64 {
    10
}

/// `[run]`: where outputs go and how long to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Output folder (config, metrics, TensorBoard events, checkpoints, final model). Default `runs/default`.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// Seed of every random stream (init, dropout, data order). Default 42.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Optimizer steps to run, >= 1. Default 100.
    #[serde(default = "default_max_steps")]
    pub max_steps: u64,
    /// Log metrics every this many steps, >= 1. Default 10.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Evaluate on `data.eval` every this many steps (0 = only at the end). Default 0.
    #[serde(default)]
    pub eval_every: u64,
    /// At most this many eval batches per evaluation (0 = the whole eval split). Default 0.
    #[serde(default)]
    pub eval_max_batches: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            output_dir: default_output_dir(),
            seed: default_seed(),
            max_steps: default_max_steps(),
            log_every: default_log_every(),
            eval_every: 0,
            eval_max_batches: 0,
        }
    }
}

fn default_vocab() -> usize {
    32000
}
fn default_hidden() -> usize {
    512
}
fn default_inter() -> usize {
    1376
}
fn default_layers() -> usize {
    8
}
fn default_heads() -> usize {
    8
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    4096
}
fn default_init_range() -> f64 {
    0.02
}

/// `[model.init]`: a random-initialised architecture (Hugging Face `config.json` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSection {
    /// `"llama"` (default), `"mistral"` or `"qwen2"`.
    #[serde(default)]
    pub family: bellows_models::Family,
    /// Vocabulary size. Default 32000.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Model width. Default 512.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// MLP width. Default 1376.
    #[serde(default = "default_inter")]
    pub intermediate_size: usize,
    /// Decoder layers. Default 8.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Query heads. Default 8.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads; default = `num_attention_heads` (no GQA).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head width; default `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon. Default 1e-5.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base. Default 10000.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest position. Default 4096.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Share the embedding with the output head. Default false.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 style); default true for `qwen2`, false otherwise.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Std of the normal weight init. Default 0.02.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

impl InitSection {
    /// The resolved architecture.
    pub fn arch(&self) -> bellows_models::ModelArch {
        use bellows_models::{Family, ModelArch};
        let heads = self.num_attention_heads.max(1);
        ModelArch {
            family: self.family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: None,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias.unwrap_or(self.family == Family::Qwen2),
            initializer_range: self.initializer_range,
            bos_token_id: None,
            eos_token_id: None,
            sliding_window: None,
        }
    }
}

/// `[model]`: a Hugging Face folder (`path`) or a random init (`[model.init]`); `path` wins when both are set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model folder (`config.json` + safetensors).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Random initialisation from an architecture.
    #[serde(default)]
    pub init: Option<InitSection>,
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Half-cosine from `lr` to `lr·min_lr_ratio` (transformers' `get_cosine_schedule_with_warmup` when the ratio is 0).
    #[default]
    Cosine,
    /// Linear decay from `lr` to `lr·min_lr_ratio`.
    Linear,
    /// Constant after warmup.
    Constant,
}

fn default_lr() -> f64 {
    3e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_opt_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_accum() -> usize {
    1
}

/// `[optim]`: AdamW (Loshchilov & Hutter 2019) with PyTorch's semantics, schedule, clipping, accumulation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate, > 0. Default 3e-4.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Decoupled weight decay, >= 0. Default 0.
    #[serde(default)]
    pub weight_decay: f64,
    /// Adam β1 in [0, 1). Default 0.9.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Adam β2 in [0, 1). Default 0.999.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adam ε, > 0. Default 1e-8 (PyTorch's; burn's own default is 1e-5).
    #[serde(default = "default_opt_eps")]
    pub eps: f64,
    /// Linear warmup steps from 0. Default 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Schedule after warmup: `"cosine"` (default), `"linear"`, `"constant"`.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Final lr as a fraction of `lr`, in [0, 1]. Default 0.
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Clip the global L2 norm of all gradients to this (0 = off). Default 1.0.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Micro-batches per optimizer step, >= 1. Default 1.
    #[serde(default = "default_accum")]
    pub grad_accum_steps: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: default_lr(),
            weight_decay: 0.0,
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_opt_eps(),
            warmup_steps: 0,
            scheduler: Scheduler::Cosine,
            min_lr_ratio: 0.0,
            max_grad_norm: default_clip(),
            grad_accum_steps: default_accum(),
        }
    }
}

/// Numeric precision of the forward/backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere (default).
    #[default]
    F32,
    /// bfloat16 compute with f32 master weights.
    Bf16,
    /// float16 compute with dynamic loss scaling.
    Fp16,
}

fn default_device() -> String {
    "cpu".into()
}

/// Storage dtype of the trained weights and their optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ParamDtype {
    /// f32 master weights and AdamW moments (default; the usual mixed precision).
    #[default]
    F32,
    /// "Pure bf16": weights and AdamW moments stored in bf16 (half the memory, coarser updates).
    /// Needs `precision = "bf16"`.
    Bf16,
}

/// What a step with a non-finite loss or gradient does (fp16's loss-scaled overflows are always
/// skipped: the loss scaler expects them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Skip the update, count it (`skipped_steps` in the metrics) and go on (default).
    #[default]
    Skip,
    /// Write a checkpoint and stop with an error naming the step.
    Stop,
}

fn default_init_scale() -> f64 {
    65536.0
}
fn default_growth_factor() -> f64 {
    2.0
}
fn default_backoff_factor() -> f64 {
    0.5
}
fn default_growth_interval() -> u64 {
    2000
}

/// `[train.loss_scale]`: fp16's dynamic loss scaling (PyTorch `GradScaler`'s defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossScaleSection {
    /// The first scale (default 65536).
    #[serde(default = "default_init_scale")]
    pub init: f64,
    /// Multiplier after `growth_interval` overflow-free steps (default 2).
    #[serde(default = "default_growth_factor")]
    pub growth_factor: f64,
    /// Multiplier after an overflow (default 0.5).
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
    /// Overflow-free steps between growths (default 2000).
    #[serde(default = "default_growth_interval")]
    pub growth_interval: u64,
}

impl Default for LossScaleSection {
    fn default() -> Self {
        LossScaleSection {
            init: default_init_scale(),
            growth_factor: default_growth_factor(),
            backoff_factor: default_backoff_factor(),
            growth_interval: default_growth_interval(),
        }
    }
}

fn default_spike_factor() -> f64 {
    3.0
}

/// `[train]`: device, precision, threads, numerical-fault handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// `"cpu"` (default), `"cuda"` or `"cuda:N"`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `"f32"` (default), `"bf16"`, `"fp16"`.
    #[serde(default)]
    pub precision: Precision,
    /// `"f32"` (default) master weights, or `"bf16"` for pure-bf16 training.
    #[serde(default)]
    pub param_dtype: ParamDtype,
    /// fp16's dynamic loss scaler.
    #[serde(default)]
    pub loss_scale: LossScaleSection,
    /// `"skip"` (default) or `"stop"` on a non-finite loss or gradient.
    #[serde(default)]
    pub on_nonfinite: NonFinitePolicy,
    /// Log a loss spike when a step's loss exceeds this multiple of the running mean (0 = off;
    /// default 3).
    #[serde(default = "default_spike_factor")]
    pub spike_factor: f64,
    /// CPU threads for tensor kernels (0 = the cores available to this process, split between local ranks). Default 0.
    #[serde(default)]
    pub threads: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            device: default_device(),
            precision: Precision::F32,
            param_dtype: ParamDtype::F32,
            loss_scale: LossScaleSection::default(),
            on_nonfinite: NonFinitePolicy::Skip,
            spike_factor: default_spike_factor(),
            threads: 0,
        }
    }
}

/// Progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProgressStyle {
    /// A bar on a terminal, plain lines otherwise (default).
    #[default]
    Auto,
    /// Always a bar.
    Bar,
    /// Always plain lines.
    Plain,
    /// Nothing but errors.
    Quiet,
}

fn default_true() -> bool {
    true
}

/// `[logging]`: metrics outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Write TensorBoard event files under `<output_dir>/tensorboard`. Default true.
    #[serde(default = "default_true")]
    pub tensorboard: bool,
    /// `"auto"` (default), `"bar"`, `"plain"`, `"quiet"`.
    #[serde(default)]
    pub progress: ProgressStyle,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            tensorboard: true,
            progress: ProgressStyle::Auto,
        }
    }
}

fn default_keep_last() -> usize {
    2
}

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(from = "String", into = "String")]
pub enum Resume {
    /// Start fresh (default).
    #[default]
    None,
    /// The newest complete checkpoint in `<output_dir>/checkpoints`, if any.
    Latest,
    /// A specific checkpoint folder.
    Path(PathBuf),
}

impl From<String> for Resume {
    fn from(s: String) -> Self {
        match s.as_str() {
            "none" | "" => Resume::None,
            "latest" => Resume::Latest,
            _ => Resume::Path(PathBuf::from(s)),
        }
    }
}

impl From<Resume> for String {
    fn from(r: Resume) -> Self {
        match r {
            Resume::None => "none".into(),
            Resume::Latest => "latest".into(),
            Resume::Path(p) => p.display().to_string(),
        }
    }
}

/// `[checkpoint]`: periodic, rotated, atomic checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save every this many steps (0 = off). Default 0.
    #[serde(default)]
    pub every_steps: u64,
    /// Also save when this many seconds passed since the last save (0 = off). Default 0.
    #[serde(default)]
    pub every_secs: u64,
    /// Keep only the newest this many checkpoints, >= 1. Default 2.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// `"none"` (default), `"latest"`, or a checkpoint folder.
    #[serde(default)]
    pub resume: Resume,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every_steps: 0,
            every_secs: 0,
            keep_last: default_keep_last(),
            resume: Resume::None,
        }
    }
}
