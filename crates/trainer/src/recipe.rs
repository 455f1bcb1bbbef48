//! The training recipe: one function that reads top to bottom, built from public helpers.

use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{
    backend::AutodiffBackend, backend::Backend, DType, ElementConversion, Int, Tensor, TensorData,
};

use bellows_data::{Batch, LoaderSpec, Prefetcher, Split, TokenLoader};
use bellows_models::{causal_lm_loss_sum, CausalLm, ForwardInput, ModelArch};
use bellows_peft::LoraPlan;

use crate::adamw::FusedAdamW;
use crate::build::build_model_sharded;
use crate::checkpoint::{
    load_checkpoint, resolve_resume, save_checkpoint, truncate_metrics, write_model_card,
    CheckpointCtx, OptimRef, StopSignal, TrainProgress,
};
use crate::config::{NonFinitePolicy, ParamDtype, Precision, RunConfig};
use crate::fsdp::Fsdp;
use crate::health::SpikeDetector;
use crate::metrics::{MetricsSink, StepMetrics};
use crate::precision::{cast_params, compute_dtype, LossScaler};
use crate::progress::Progress;
use crate::zero::{AdamWParams, ZeroAdamW};
use crate::{schedule, update, Accelerator, Error, Result};
use bellows_dist::Strategy;

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Held-out loss at the end, if `data.eval` is set.
    pub eval_loss: Option<f64>,
    /// Loss-counted training tokens (all ranks).
    pub tokens: u64,
    /// Every step's loss, in order (including steps before a resume).
    pub losses: Vec<f64>,
    /// The signal that stopped the run early (after a checkpoint), if one did.
    pub stopped_by: Option<String>,
    /// Steps whose update was skipped (non-finite gradients, fp16 overflow).
    pub skipped_steps: u64,
    /// Loss spikes the detector logged.
    pub loss_spikes: u64,
    /// fp16's loss scale at the end (`None` for other precisions).
    pub loss_scale: Option<f64>,
}

/// Token ids of a batch as a `[batch, seq]` tensor.
pub fn batch_ids<B: Backend>(batch: &Batch, device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = batch.input_ids.iter().map(|&t| i64::from(t)).collect();
    Tensor::from_data(
        TensorData::new(ids, [batch.batch_size, batch.seq_len]),
        device,
    )
}

/// Runs a forward pass on `batch` (matmuls in `compute`, if set) and returns the summed f32
/// loss and its token count.
pub fn batch_loss<B: Backend>(
    model: &CausalLm<B>,
    batch: &Batch,
    device: &B::Device,
    compute: Option<DType>,
) -> (Tensor<B, 1>, usize) {
    let input = ForwardInput {
        positions: &batch.position_ids,
        segments: Some(&batch.segment_ids),
        compute,
    };
    let logits = model.forward(batch_ids(batch, device), &input);
    let l = causal_lm_loss_sum(logits, &batch.labels);
    (l.sum, l.tokens)
}

/// Token-weighted mean loss over the eval split (at most `max_batches`, 0 = all), reduced over ranks.
///
/// # Errors
/// The data pipeline or a collective fails.
pub fn evaluate<B: AutodiffBackend>(
    model: &CausalLm<B>,
    cfg: &RunConfig,
    acc: &Accelerator,
    vocab_size: usize,
    device: &B::Device,
) -> Result<Option<f64>> {
    if cfg.data.eval.is_none() {
        return Ok(None);
    }
    let spec = LoaderSpec {
        split: Split::Eval,
        shard: acc.shard(),
        seed: cfg.run.seed,
        vocab_size,
    };
    let mut loader = TokenLoader::new(&cfg.data, spec)?;
    let inner = model.valid();
    let (mut sum, mut count) = (0f64, 0f64);
    let mut n = 0;
    while let Some(batch) = loader.next_batch()? {
        let (s, t) = batch_loss(&inner, &batch, device, compute_dtype(cfg.train.precision));
        sum += s.into_scalar().elem::<f64>();
        count += t as f64;
        n += 1;
        if cfg.run.eval_max_batches > 0 && n >= cfg.run.eval_max_batches {
            break;
        }
    }
    let totals = acc.sum(&[sum, count])?;
    Ok((totals[1] > 0.0).then(|| totals[0] / totals[1]))
}

/// Trains on `device` with backend `B` as `cfg` says. The recipe: build → sync → loop
/// (accumulate micro-batches, token-exact loss, all-reduce, clip, step, log, evaluate) → save.
///
/// While it runs, SIGTERM and SIGINT are caught: the first finishes the current step, writes a
/// checkpoint and returns the report with `stopped_by` set; a second exits the process at once.
/// `checkpoint.resume` picks up an earlier run (see the `checkpoint` module).
///
/// # Errors
/// Any failure of model, data, collectives or outputs.
pub fn train_on<B: AutodiffBackend>(
    cfg: &RunConfig,
    acc: &Accelerator,
    device: &B::Device,
) -> Result<TrainReport> {
    B::seed(device, cfg.run.seed);
    let stop = StopSignal::install()?;
    let plan = cfg.peft.plan()?;
    let compute = compute_dtype(cfg.train.precision);
    // `param_dtype = "bf16"` is only valid with bf16 precision, so `compute` covers it too.
    if let Some(dt) = compute.filter(|&dt| !B::supports_dtype(device, dt)) {
        return Err(Error::Device {
            device: cfg.train.device.clone(),
            message: format!(
                "this backend cannot compute in {dt:?} (train.precision / train.param_dtype)"
            ),
        });
    }
    // FSDP: the model is built sharded, and only its whole parameters are broadcast.
    let prefetch = cfg.dist.prefetch;
    let fsdp = match cfg.dist.strategy {
        Strategy::Fsdp => Some(Fsdp::new(acc.shared_group(), prefetch)?),
        Strategy::Hybrid => Some(Fsdp::hybrid(acc.shared_group(), acc.placement(), prefetch)?),
        _ => None,
    };
    let (arch, model) =
        build_model_sharded::<B>(cfg, &plan, device, fsdp.as_ref().map(Fsdp::group))?;
    let model = match cfg.train.param_dtype {
        ParamDtype::F32 => model,
        ParamDtype::Bf16 => cast_params(model, DType::BF16),
    };
    let mut model = match &fsdp {
        Some(f) => f.broadcast_whole(model)?,
        None => acc.broadcast_params(model)?,
    };
    let fp16 = cfg.train.precision == Precision::Fp16;
    let mut scaler = fp16.then(|| LossScaler::new(&cfg.train.loss_scale));
    let mut spikes = SpikeDetector::new(cfg.train.spike_factor);
    let out = &cfg.run.output_dir;
    if acc.is_main() {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let p = out.join("config.toml");
        std::fs::write(&p, cfg.to_toml()).map_err(|e| Error::io(&p, e))?;
    }
    let o = &cfg.optim;
    let hp = AdamWParams {
        beta1: o.beta1 as f32,
        beta2: o.beta2 as f32,
        eps: o.eps as f32,
        weight_decay: o.weight_decay as f32,
    };
    let mut optim = FusedAdamW::new(hp).init::<B, CausalLm<B>>();
    let (rank, world) = (acc.rank(), acc.world_size());
    let mut zero = match (cfg.dist.strategy, &fsdp) {
        (_, Some(f)) => Some(f.optimizer(hp, &model)),
        (Strategy::Zero1, None) => Some(ZeroAdamW::new(hp, false, rank, world)),
        (Strategy::Zero2, None) => Some(ZeroAdamW::new(hp, true, rank, world)),
        _ => None,
    };
    let spec = LoaderSpec {
        split: Split::Train,
        shard: acc.shard(),
        seed: cfg.run.seed,
        vocab_size: arch.vocab_size,
    };
    let ctx = CheckpointCtx {
        cfg,
        acc,
        arch: &arch,
        plan: &plan,
    };
    let (start, mut report, loader) = match resolve_resume(cfg)? {
        Some(dir) => {
            let t0 = Instant::now();
            let r = load_checkpoint(ctx, &dir, model, optim)?;
            (model, optim) = (r.model, r.optim);
            if let (Some(z), Some(state)) = (zero.as_mut(), r.optimizer_state.as_deref()) {
                // ZeRO keeps only this rank's rows, read from whichever files hold them.
                z.load_from(state)?;
            }
            let p = r.progress;
            if p.loss_scaler.is_some() {
                scaler = p.loss_scaler.clone();
            }
            let loader = TokenLoader::resume(&cfg.data, spec, &p.loader)?;
            if acc.is_main() {
                truncate_metrics(out, p.step)?;
                if let Some(from) = r.resharded_from {
                    eprintln!("resharded the run from {from} to {world} ranks at step {}: the rest of the data epoch is redistributed", p.step);
                }
                eprintln!(
                    "resumed from {} at step {} in {:.3}s",
                    dir.display(),
                    p.step,
                    t0.elapsed().as_secs_f64()
                );
            }
            let mut report = report_from(p.step, p.tokens, p.losses);
            report.skipped_steps = p.skipped_steps;
            (p.step, report, loader)
        }
        None => {
            if acc.is_main() {
                // A run from step 0 starts a new log (e.g. after a run killed before its first
                // checkpoint), so every step appears once.
                truncate_metrics(out, 0)?;
            }
            (
                0,
                report_from(0, 0, Vec::new()),
                TokenLoader::new(&cfg.data, spec)?,
            )
        }
    };
    // FSDP shards after any resume: checkpoints hold whole tensors, whatever the world size.
    if let Some(f) = &fsdp {
        eprintln!("{}", f.summary(&model));
    }
    let mut loader = Prefetcher::new(loader, 4);
    let mut last_save = Instant::now();
    let mut sink = if acc.is_main() {
        Some(MetricsSink::open(out, cfg.logging.tensorboard)?)
    } else {
        None
    };
    let total = cfg.run.max_steps;
    let progress = Progress::new(cfg.logging.progress, total, start, acc.is_main());
    let mut window = (Instant::now(), 0u64);
    for step in start + 1..=total {
        crate::keep_warm();
        // Dropout masks become a function of (seed, step, rank), so a resumed run draws the same ones.
        B::seed(device, step_seed(cfg.run.seed, step, acc.rank()));
        let lr = schedule::lr_at(o, step, total);
        let mut batches = Vec::with_capacity(o.grad_accum_steps);
        for _ in 0..o.grad_accum_steps {
            batches.push(loader.next_batch()?.ok_or(Error::NoData)?);
        }
        let last_state = batches.last().map(|b| b.state_after.clone());
        let local_tokens: usize = batches.iter().map(Batch::label_tokens).sum();
        let global_tokens = acc.sum(&[local_tokens as f64])?[0];
        let denom = global_tokens.max(1.0);
        let mut accum = GradientsAccumulator::<CausalLm<B>>::new();
        let mut loss_sum = 0f64;
        // fp16: the loss is scaled up before the backward pass; `update::apply` divides it out.
        let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
        for batch in &batches {
            let (sum, _) = batch_loss(&model, batch, device, compute);
            loss_sum += sum.clone().into_scalar().elem::<f64>();
            let g = sum.div_scalar(denom / loss_scale).backward();
            if let Some(f) = &fsdp {
                f.check()?;
            }
            accum.accumulate(&model, GradientsParams::from_grads(g, &model));
        }
        let g = accum.grads();
        let up;
        match zero.as_mut() {
            Some(z) => {
                // ZeRO-2 reduce-scatters inside the step; ZeRO-1 all-reduces like DDP.
                let g = if z.stage2 {
                    g
                } else {
                    acc.sync_grads(&model, g)?
                };
                // FSDP's optimizer works over the shard group (the node's, for hybrid).
                let pg = fsdp.as_ref().map_or(acc.process_group(), Fsdp::shard_group);
                (model, up) =
                    update::apply_zero(model, z, &g, pg, lr, o.max_grad_norm, scaler.as_mut())?;
            }
            None => {
                let g = acc.sync_grads(&model, g)?;
                (model, up) =
                    update::apply(model, &mut optim, g, lr, o.max_grad_norm, scaler.as_mut());
            }
        }
        let norm = up.grad_norm;
        if !up.applied {
            report.skipped_steps += 1;
        }
        // Stop requests and the time-based interval ride on this all-reduce so every rank agrees.
        let signal = stop.received();
        let secs_due = acc.is_main()
            && cfg.checkpoint.every_secs > 0
            && last_save.elapsed().as_secs() >= cfg.checkpoint.every_secs;
        let reduced = acc.sum(&[
            loss_sum,
            f64::from(u8::from(signal.is_some())),
            f64::from(u8::from(secs_due)),
        ])?;
        let loss = reduced[0] / denom;
        let (stop_now, secs_due) = (reduced[1] > 0.0, reduced[2] > 0.0);
        // fp16 overflows are the loss scaler's business; anything else non-finite is a fault.
        let nonfinite = !fp16 && (!up.applied || !loss.is_finite());
        let nonfinite_stop = nonfinite && cfg.train.on_nonfinite == NonFinitePolicy::Stop;
        if acc.is_main() {
            if nonfinite {
                eprintln!(
                    "step {step}: non-finite loss {loss} / gradient norm {norm}; update skipped ({} skipped so far)",
                    report.skipped_steps
                );
            }
            if let Some(mean) = spikes.observe(loss) {
                eprintln!("step {step}: loss spike {loss:.4} (running mean {mean:.4})");
            }
        } else {
            spikes.observe(loss);
        }
        report.loss_spikes = spikes.spikes;
        report.loss_scale = scaler.as_ref().map(|s| s.scale);
        report.steps = step;
        report.tokens += global_tokens as u64;
        report.losses.push(loss);
        if step == 1 {
            report.first_loss = loss;
        }
        report.final_loss = loss;
        window.1 += global_tokens as u64;
        progress.step(step);
        let eval_now = cfg.run.eval_every > 0 && step % cfg.run.eval_every == 0;
        let eval_loss = if eval_now || step == total {
            evaluate(&model, cfg, acc, arch.vocab_size, device)?
        } else {
            None
        };
        if step == total {
            report.eval_loss = eval_loss;
        }
        if step % cfg.run.log_every == 0 || step == total || step == 1 || eval_loss.is_some() {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            let m = StepMetrics {
                step,
                loss,
                lr,
                grad_norm: norm,
                tokens_per_sec: window.1 as f64 / secs,
                tokens: report.tokens,
                eval_loss,
                loss_scale: report.loss_scale,
                skipped_steps: report.skipped_steps,
            };
            progress.log(&m);
            if let Some(s) = &mut sink {
                s.log(&m)?;
            }
            window = (Instant::now(), 0);
        }
        let steps_due = cfg.checkpoint.every_steps > 0 && step % cfg.checkpoint.every_steps == 0;
        if steps_due || secs_due || stop_now || nonfinite_stop {
            let p = TrainProgress {
                step,
                tokens: report.tokens,
                losses: report.losses.clone(),
                loader: last_state.clone().ok_or(Error::NoData)?,
                loss_scaler: scaler.clone(),
                skipped_steps: report.skipped_steps,
            };
            let optim_ref = match &zero {
                Some(z) => OptimRef::Zero(z),
                None => OptimRef::Burn(&optim),
            };
            // An FSDP model is saved sharded: each rank writes its rows.
            let dir = save_checkpoint(ctx, &model, optim_ref, &p)?;
            last_save = Instant::now();
            if nonfinite_stop {
                progress.finish();
                return Err(Error::NonFinite {
                    step,
                    what: format!("loss {loss} / gradient norm {norm}"),
                    checkpoint: dir,
                });
            }
            if stop_now {
                let name = signal.unwrap_or("a stop signal on another rank");
                if acc.is_main() {
                    eprintln!(
                        "received {name}: saved {} after step {step}; rerun with checkpoint.resume = \"latest\" to continue",
                        dir.display()
                    );
                }
                report.stopped_by = Some(name.to_string());
                break;
            }
        }
    }
    progress.finish();
    if world > 1 {
        eprintln!(
            "rank {rank}: peak RSS {:.0} MiB while training (before the final save)",
            crate::peak_rss_mib()
        );
    }
    if let Some(z) = &zero {
        let full = 8 * crate::plan::count_params(&arch, &plan).trainable;
        eprintln!(
            "zero: rank {rank} of {world} holds {} bytes of optimizer state (unsharded: {full})",
            z.state_bytes()
        );
    }
    if report.stopped_by.is_some() {
        acc.barrier()?;
        return Ok(report);
    }
    let model = match &fsdp {
        Some(f) => f.for_saving(model, &plan, acc.is_main())?,
        None => model,
    };
    if acc.is_main() {
        save_final(&model, &arch, &plan, cfg, out)?;
        write_model_card(cfg, &report)?;
    }
    acc.barrier()?;
    Ok(report)
}

/// Writes the final model: the adapter in PEFT format (`<out>/adapter`) when adapters are used,
/// otherwise a Hugging Face model folder (`<out>/model`).
///
/// # Errors
/// The files cannot be written.
pub fn save_final<B: AutodiffBackend>(
    model: &CausalLm<B>,
    arch: &ModelArch,
    plan: &LoraPlan,
    cfg: &RunConfig,
    out: &Path,
) -> Result<()> {
    let inner = model.valid();
    if plan.uses_adapters() {
        let base = cfg
            .model
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        bellows_models::save_adapter(&inner, &cfg.peft, &base, &out.join("adapter"))?;
    } else {
        bellows_models::save_pretrained(&inner, arch, &out.join("model"))?;
    }
    Ok(())
}

/// The backend seed for optimizer step `step` on rank `rank`: a SplitMix64 mix of the three.
fn step_seed(seed: u64, step: u64, rank: usize) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank as u64).rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A report of `steps` completed steps.
fn report_from(steps: u64, tokens: u64, losses: Vec<f64>) -> TrainReport {
    TrainReport {
        steps,
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        eval_loss: None,
        tokens,
        losses,
        stopped_by: None,
        skipped_steps: 0,
        loss_spikes: 0,
        loss_scale: None,
    }
}
