//! The pieces of `bellows gpu-check` (run by `scripts/gpu-check.sh` on a GPU host): golden-model
//! parity on a device against the CPU and transformers, the device's measured matmul peak, and a
//! short training run compared across devices and precisions. Backend-generic, so every piece
//! also runs (and is tested) on the CPU.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{
    backend::Backend, DType, Distribution, ElementConversion, Int, Tensor, TensorData,
};
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use bellows_models::{causal_lm_loss_sum, load_pretrained, CausalLm, ForwardInput};
use bellows_peft::LoraPlan;

use crate::config::{Precision, RunConfig};
use crate::{bench_on, BenchMode, BenchSpec, Error, Result};

/// One golden model case evaluated on a device.
#[derive(Debug, Clone, Serialize)]
pub struct ParityCase {
    /// The case folder name under `tests/golden`.
    pub case: String,
    /// Largest |logit − transformers' logit| (f32 compute).
    pub logits_max_abs_diff: f64,
    /// transformers' loss (from the golden file).
    pub loss_reference: f64,
    /// This device's loss, f32 compute.
    pub loss_f32: f64,
    /// This device's loss, bf16 compute (f32 weights).
    pub loss_bf16: Option<f64>,
}

/// Golden model cases: folders of `root` whose `case.json` says `"kind": "model"` and that hold
/// `config.json`, `model.safetensors` (or an index), `inputs.safetensors` and
/// `expected.safetensors`, sorted by name.
///
/// # Errors
/// `root` cannot be listed.
pub fn golden_model_cases(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let p = e.map_err(|e| Error::io(root, e))?.path();
        let has = |f: &str| p.join(f).is_file();
        let kind = std::fs::read(p.join("case.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["kind"].as_str().map(str::to_string));
        if kind.as_deref() == Some("model")
            && has("config.json")
            && (has("model.safetensors") || has("model.safetensors.index.json"))
            && has("inputs.safetensors")
            && has("expected.safetensors")
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads tensor `name` of `path` as f64 values (f32, bf16, i64 or u8 files).
fn read_values(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::Internal(format!("{}: {name}: {m}", path.display()));
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let v = st.tensor(name).map_err(|e| bad(e.to_string()))?;
    let d = v.data();
    let values = match v.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        other => return Err(bad(format!("unsupported dtype {other:?}"))),
    };
    Ok((v.shape().to_vec(), values))
}

fn logits_and_loss<B: Backend>(
    model: &CausalLm<B>,
    ids: &[i64],
    labels: &[i64],
    (b, s): (usize, usize),
    compute: Option<DType>,
    device: &B::Device,
) -> (Vec<f32>, f64) {
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [b, s]), device);
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
    let input = ForwardInput {
        positions: &positions,
        segments: None,
        compute,
    };
    let logits = model.forward(t, &input);
    let logits = bellows_peft::in_dtype(logits, DType::F32);
    let l = causal_lm_loss_sum(logits.clone(), labels);
    let loss = l.sum.into_scalar().elem::<f64>() / l.tokens.max(1) as f64;
    let values = logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    (values, loss)
}

/// Evaluates one golden case on `device`: logits against transformers' (f32) and the loss in
/// f32 and, where the backend has it, bf16 compute.
///
/// # Errors
/// The case's files cannot be read.
pub fn parity_case<B: Backend>(dir: &Path, device: &B::Device) -> Result<ParityCase> {
    let (_, model) = load_pretrained::<B>(dir, &LoraPlan::none(), device)?;
    let inputs = dir.join("inputs.safetensors");
    let (shape, ids) = read_values(&inputs, "input_ids")?;
    let (_, labels) = read_values(&inputs, "labels")?;
    let bs = (shape[0], shape[1]);
    let ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
    let labels: Vec<i64> = labels.iter().map(|&v| v as i64).collect();
    let expected = dir.join("expected.safetensors");
    let (_, exp_logits) = read_values(&expected, "logits")?;
    let (_, exp_loss) = read_values(&expected, "loss")?;
    let (logits, loss_f32) = logits_and_loss(&model, &ids, &labels, bs, None, device);
    let logits_max_abs_diff = logits
        .iter()
        .zip(&exp_logits)
        .map(|(&g, &e)| (f64::from(g) - e).abs())
        .fold(
            if logits.len() == exp_logits.len() {
                0.0
            } else {
                f64::INFINITY
            },
            f64::max,
        );
    let loss_bf16 = B::supports_dtype(device, DType::BF16)
        .then(|| logits_and_loss(&model, &ids, &labels, bs, Some(DType::BF16), device).1);
    Ok(ParityCase {
        case: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        logits_max_abs_diff,
        loss_reference: exp_loss.first().copied().unwrap_or(f64::NAN),
        loss_f32,
        loss_bf16,
    })
}

/// Measured dense matmul throughput on `device`, in TFLOP/s: `[n, n] × [n, n]` in `dtype`, the
/// mean of `iters` products after two warm-ups (which also absorb kernel compilation/autotune).
pub fn matmul_tflops<B: Backend>(n: usize, dtype: DType, iters: usize, device: &B::Device) -> f64 {
    let dist = Distribution::Uniform(-1.0, 1.0);
    let a = Tensor::<B, 2>::random([n, n], dist, device).cast(dtype);
    let b = Tensor::<B, 2>::random([n, n], dist, device).cast(dtype);
    for _ in 0..2 {
        let _ = a.clone().matmul(b.clone());
        B::sync(device).ok();
    }
    let t = Instant::now();
    for _ in 0..iters.max(1) {
        let _ = a.clone().matmul(b.clone());
    }
    B::sync(device).ok();
    let secs = t.elapsed().as_secs_f64().max(1e-12);
    2.0 * (n as f64).powi(3) * iters.max(1) as f64 / secs / 1e12
}

/// What `bellows gpu-check` runs.
#[derive(Debug, Clone)]
pub struct GpuCheckOptions {
    /// `"cuda"`, `"cuda:N"`, or `"cpu"` (to exercise the check itself without a GPU).
    pub device: String,
    /// The golden folder (`tests/golden`).
    pub golden: PathBuf,
    /// The job file trained on each device for the loss-curve comparison.
    pub config: PathBuf,
    /// Steps of that comparison.
    pub train_steps: u64,
    /// Where those runs write.
    pub out: PathBuf,
    /// Matmul size for the peak measurement.
    pub peak_n: usize,
    /// Timed steps of the LoRA benchmark (0 skips it).
    pub bench_steps: usize,
    /// The benchmark's workload.
    pub bench_mode: BenchMode,
}

/// One line of the check's report: a JSON object with `check` and `ok`.
pub type Emit<'a> = &'a mut dyn FnMut(serde_json::Value);

/// Runs every check, emitting one JSON object per finding; returns whether all passed.
///
/// # Errors
/// An unusable device, or files that cannot be read or written.
pub fn gpu_check(opts: &GpuCheckOptions, emit: Emit<'_>) -> Result<bool> {
    let mut ok = guarded("device", emit, |e| device_checks(opts, e))?;
    ok &= guarded("train_curve", emit, |e| train_curves(opts, e))?;
    ok &= guarded("nccl", emit, |e| Ok(nccl_check(opts, e)))?;
    if opts.bench_steps > 0 {
        ok &= guarded("bench", emit, |e| bench_check(opts, e))?;
    }
    emit(serde_json::json!({"check": "summary", "ok": ok}));
    Ok(ok)
}

/// Runs one group of checks; a panic inside it (a backend kernel failing on an unattended host)
/// becomes a failed finding instead of ending the whole check.
fn guarded(name: &str, emit: Emit<'_>, f: impl FnOnce(Emit<'_>) -> Result<bool>) -> Result<bool> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *emit))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            emit(serde_json::json!({"check": name, "ok": false, "panic": msg}));
            Ok(false)
        }
    }
}

fn device_checks(opts: &GpuCheckOptions, emit: Emit<'_>) -> Result<bool> {
    match crate::DeviceSpec::parse(&opts.device).map_err(|m| Error::Device {
        device: opts.device.clone(),
        message: m,
    })? {
        crate::DeviceSpec::Cpu => {
            let peak = peaks::<burn::backend::Flex>(opts, &Default::default(), emit);
            PEAK.with(|p| p.set(peak));
            parity::<burn::backend::Flex>(opts, &Default::default(), emit)
        }
        #[cfg(feature = "cuda")]
        crate::DeviceSpec::Cuda(index) => {
            if !crate::cuda_available() {
                return Err(Error::Device {
                    device: opts.device.clone(),
                    message: "no CUDA driver (libcuda) found on this machine".into(),
                });
            }
            let d = burn::backend::cuda::CudaDevice::new(index.unwrap_or(0));
            let peak = peaks::<burn::backend::Cuda>(opts, &d, emit);
            PEAK.with(|p| p.set(peak));
            parity::<burn::backend::Cuda>(opts, &d, emit)
        }
        #[cfg(not(feature = "cuda"))]
        crate::DeviceSpec::Cuda(_) => Err(Error::Device {
            device: opts.device.clone(),
            message: "this bellows was built without CUDA support; rebuild with `--features cuda`"
                .into(),
        }),
    }
}

thread_local! {
    /// The bf16 peak measured by [`peaks`], for the benchmark's MFU.
    static PEAK: std::cell::Cell<f64> = const { std::cell::Cell::new(f64::NAN) };
}

fn peaks<B: Backend>(opts: &GpuCheckOptions, device: &B::Device, emit: Emit<'_>) -> f64 {
    let n = opts.peak_n;
    let f32_tflops = matmul_tflops::<B>(n, DType::F32, 5, device);
    let bf16_tflops = B::supports_dtype(device, DType::BF16)
        .then(|| matmul_tflops::<B>(n, DType::BF16, 10, device));
    emit(serde_json::json!({
        "check": "matmul_peak", "ok": true, "n": n,
        "f32_tflops": f32_tflops, "bf16_tflops": bf16_tflops,
    }));
    bf16_tflops.unwrap_or(f32_tflops)
}

/// Tolerances of the device's "f32" against the CPU: (logits abs, loss relative). On the CPU
/// f32 is f32. On CUDA, burn 0.21's matmul (cubek-matmul) runs f32 products on TF32 tensor cores
/// (10-bit mantissa, as PyTorch with `allow_tf32`): measured on an H200, logits moved by up to
/// 4.1e-3 and losses by up to 1.04e-4 relative on the golden models.
fn f32_tolerances(device: &str) -> (f64, f64) {
    if device == "cpu" {
        (1e-4, 1e-5)
    } else {
        (1e-2, 1e-3)
    }
}

/// Every golden case on the device and on the CPU: f32 (TF32 on CUDA) logits and losses within
/// [`f32_tolerances`] of transformers' and the CPU's; bf16 losses within 2 % of transformers'.
fn parity<B: Backend>(opts: &GpuCheckOptions, device: &B::Device, emit: Emit<'_>) -> Result<bool> {
    let (logits_tol, loss_tol) = f32_tolerances(&opts.device);
    let mut all = true;
    for dir in golden_model_cases(&opts.golden)? {
        let dev = parity_case::<B>(&dir, device)?;
        let cpu = parity_case::<burn::backend::Flex>(&dir, &Default::default())?;
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1.0);
        let bf16_ok = match (dev.loss_bf16, cpu.loss_bf16) {
            (Some(d), Some(_)) => rel(d, dev.loss_reference) <= 0.02,
            _ => true,
        };
        let ok = rel(dev.loss_f32, cpu.loss_f32) <= loss_tol
            && dev.logits_max_abs_diff <= logits_tol
            && bf16_ok;
        all &= ok;
        emit(serde_json::json!({
            "check": "golden_parity", "ok": ok, "case": dev.case,
            "logits_max_abs_diff": dev.logits_max_abs_diff,
            "loss_transformers": dev.loss_reference,
            "loss_device_f32": dev.loss_f32, "loss_cpu_f32": cpu.loss_f32,
            "loss_device_bf16": dev.loss_bf16, "loss_cpu_bf16": cpu.loss_bf16,
            "tolerance_logits": logits_tol, "tolerance_loss_rel": loss_tol,
        }));
    }
    Ok(all)
}

/// Trains `opts.config` for `train_steps` on the CPU (f32) and on the device in f32, bf16 and fp16;
/// the device's f32 curve must stay within 1e-3 (relative) of the CPU's, bf16 within 5 %, fp16 2 %.
fn train_curves(opts: &GpuCheckOptions, emit: Emit<'_>) -> Result<bool> {
    let run = |device: &str, precision: &str| -> Result<(Vec<f64>, f64)> {
        let label = format!("{}-{precision}", device.replace(':', "_"));
        let sets = [
            format!("run.max_steps={}", opts.train_steps),
            format!(
                "run.output_dir={:?}",
                opts.out.join(&label).display().to_string()
            ),
            "run.eval_every=0".into(),
            "logging.progress=\"plain\"".into(),
            "logging.tensorboard=false".into(),
            "checkpoint.every_steps=0".into(),
            format!("train.device={device:?}"),
            format!("train.precision={precision:?}"),
        ];
        let cfg = RunConfig::load(&opts.config, &sets)?;
        let t = Instant::now();
        let r = crate::train(&cfg)?;
        Ok((r.losses, t.elapsed().as_secs_f64()))
    };
    let (cpu, cpu_secs) = run("cpu", "f32")?;
    let mut all = true;
    for (precision, tol) in [("f32", 1e-3), ("bf16", 0.05), ("fp16", 0.02)] {
        let (dev, secs) = run(&opts.device, precision)?;
        let worst = cpu
            .iter()
            .zip(&dev)
            .map(|(c, d)| (c - d).abs() / c.abs().max(1.0))
            .fold(
                if cpu.len() == dev.len() {
                    0.0
                } else {
                    f64::INFINITY
                },
                f64::max,
            );
        let ok = worst <= tol;
        all &= ok;
        emit(serde_json::json!({
            "check": "train_curve", "ok": ok, "precision": precision,
            "steps": dev.len(), "max_rel_diff_vs_cpu_f32": worst, "tolerance": tol,
            "first_last_cpu": [cpu.first(), cpu.last()],
            "first_last_device": [dev.first(), dev.last()],
            "secs_cpu": cpu_secs, "secs_device": secs,
        }));
    }
    Ok(all)
}

/// A world-size-1 NCCL communicator on the device: all-reduce and all-gather of 64 MiB.
fn nccl_check(opts: &GpuCheckOptions, emit: Emit<'_>) -> bool {
    let index = match crate::DeviceSpec::parse(&opts.device) {
        Ok(crate::DeviceSpec::Cuda(i)) => i.unwrap_or(0),
        _ => {
            emit(serde_json::json!({"check": "nccl", "ok": true, "skipped": "not a CUDA device"}));
            return true;
        }
    };
    let result = (|| -> std::result::Result<serde_json::Value, bellows_dist::Error> {
        let pg = bellows_dist::ProcessGroup::nccl_solo(index, std::time::Duration::from_secs(60))?;
        let n = 16 << 20;
        let input: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
        let mut buf = input.clone();
        pg.all_reduce(&mut buf, bellows_dist::ReduceOp::Sum)?;
        let t = Instant::now();
        let iters = 5;
        for _ in 0..iters {
            pg.all_reduce(&mut buf, bellows_dist::ReduceOp::Sum)?;
        }
        let secs = t.elapsed().as_secs_f64() / f64::from(iters);
        let mut gathered = vec![0f32; n];
        pg.all_gather(&input, &mut gathered)?;
        let equal = buf == input && gathered == input;
        Ok(serde_json::json!({
            "check": "nccl", "ok": equal, "backend": pg.backend_name(), "world_size": 1,
            "elements": n, "all_reduce_secs": secs,
            "host_staged_gb_per_s": (n * 4) as f64 / secs / 1e9,
        }))
    })();
    match result {
        Ok(v) => {
            let ok = v["ok"].as_bool().unwrap_or(false);
            emit(v);
            ok
        }
        Err(e) => {
            emit(serde_json::json!({"check": "nccl", "ok": false, "error": e.to_string()}));
            false
        }
    }
}

fn bench_check(opts: &GpuCheckOptions, emit: Emit<'_>) -> Result<bool> {
    let peak = PEAK.with(std::cell::Cell::get);
    let spec = BenchSpec {
        mode: opts.bench_mode,
        warmup: 2,
        steps: opts.bench_steps,
        precision: Precision::Bf16,
        batch: None,
        seq: None,
        peak_tflops: peak.is_finite().then_some(peak),
    };
    let r = bench_on(&spec, &opts.device, 0)?;
    let ok = r.loss_first_last.1.is_finite();
    let mut v = serde_json::to_value(&r).map_err(|e| Error::Internal(e.to_string()))?;
    v["check"] = "bench".into();
    v["ok"] = ok.into();
    emit(v);
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn golden_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden")
    }

    #[test]
    fn golden_cases_match_on_the_cpu_in_f32_and_bf16() {
        let cases = golden_model_cases(&golden_root()).expect("golden dir");
        assert!(cases.len() >= 8, "found only {cases:?}");
        let dev = Default::default();
        for dir in cases {
            let r = parity_case::<Flex>(&dir, &dev).expect("case runs");
            assert!(r.logits_max_abs_diff <= 1e-4, "{r:?}");
            assert!((r.loss_f32 - r.loss_reference).abs() <= 1e-5, "{r:?}");
            let bf16 = r.loss_bf16.expect("Flex has bf16");
            // bf16 has 8 bits of mantissa: the loss moves by well under 2 %.
            assert!(
                (bf16 - r.loss_reference).abs() <= 0.02 * r.loss_reference.abs(),
                "{r:?}"
            );
            assert!(
                bf16 != r.loss_f32,
                "bf16 compute must actually differ: {r:?}"
            );
        }
    }

    #[test]
    fn the_whole_check_runs_on_the_cpu() {
        let out = tempfile::tempdir().expect("tmp");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        // The quickstart's data paths are relative to the repository root: make them absolute.
        let text = std::fs::read_to_string(root.join("configs/quickstart.toml")).expect("config");
        let data = root.join("configs/data/");
        let config = out.path().join("job.toml");
        std::fs::write(
            &config,
            text.replace("\"configs/data/", &format!("\"{}", data.display())),
        )
        .expect("write");
        let opts = GpuCheckOptions {
            device: "cpu".into(),
            golden: golden_root(),
            config,
            train_steps: 3,
            out: out.path().to_path_buf(),
            peak_n: 64,
            bench_steps: 1,
            bench_mode: BenchMode::Tiny,
        };
        let mut lines = Vec::new();
        let ok = gpu_check(&opts, &mut |v| lines.push(v)).expect("check runs");
        let kinds: Vec<&str> = lines.iter().filter_map(|v| v["check"].as_str()).collect();
        for k in [
            "matmul_peak",
            "golden_parity",
            "train_curve",
            "nccl",
            "bench",
            "summary",
        ] {
            assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
        }
        assert!(ok, "{lines:#?}");
    }

    #[test]
    fn matmul_peak_is_positive_and_finite() {
        let t = matmul_tflops::<Flex>(64, DType::F32, 2, &Default::default());
        assert!(t.is_finite() && t > 0.0, "{t}");
    }
}
