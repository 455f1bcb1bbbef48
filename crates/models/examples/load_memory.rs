//! Peak memory of loading a Hugging Face folder (issue 3) and of loading it NF4-quantized
//! (issue 5), measured as the process's `VmHWM`. One load per process, so each peak is its own.
//!
//! ```sh
//! cargo run -p bellows-models --example load_memory -- write /tmp/m-f32 f32    # ~436 MB, 109 M params
//! cargo run -p bellows-models --example load_memory -- write /tmp/m-bf16 bf16  # ~218 MB
//! cargo run -p bellows-models --example load_memory -- load /tmp/m-f32 dense   # or nf4, or old
//! ```
//! `old` reproduces the previous loader (random-init the whole model, then overwrite every
//! parameter from the files) for comparison. Prints one JSON line.

use std::path::Path;
use std::time::Instant;

use bellows_models::hf::{load_weights, state_dict, to_config_json, WeightFiles};
use bellows_models::{
    load_pretrained, load_pretrained_quantized, read_arch, tiny_arch, CausalLm, ModelArch,
    ParamLister,
};
use bellows_peft::{InitRng, LoraPlan, Nf4Options};
use burn::backend::Flex;
use burn::module::Module;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

type Error = Box<dyn std::error::Error>;

fn arch() -> ModelArch {
    ModelArch {
        vocab_size: 16_000,
        hidden_size: 1024,
        intermediate_size: 2752,
        num_hidden_layers: 6,
        num_attention_heads: 16,
        num_key_value_heads: 8,
        head_dim: 64,
        ..tiny_arch()
    }
}

fn status_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn write(dir: &Path, dtype: &str) -> Result<(), Error> {
    let arch = arch();
    let model = CausalLm::<Flex>::new(
        &arch,
        &LoraPlan::none(),
        &mut InitRng::new(1),
        &Default::default(),
    );
    let tensors = state_dict(&model, false);
    drop(model);
    let (dt, bytes): (Dtype, Vec<Vec<u8>>) = match dtype {
        "f32" => (
            Dtype::F32,
            tensors
                .iter()
                .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
                .collect(),
        ),
        "bf16" => (
            Dtype::BF16,
            tensors
                .iter()
                .map(|(_, _, v)| {
                    v.iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                        .collect()
                })
                .collect(),
        ),
        other => return Err(format!("dtype {other:?}: use f32 or bf16").into()),
    };
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((name.clone(), TensorView::new(dt, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    std::fs::create_dir_all(dir)?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    let dtype_name = if dt == Dtype::F32 {
        "float32"
    } else {
        "bfloat16"
    };
    std::fs::write(
        dir.join("config.json"),
        to_config_json(&arch, dtype_name).to_string(),
    )?;
    println!(
        "wrote {} ({} tensors, {dtype})",
        dir.display(),
        tensors.len()
    );
    Ok(())
}

fn load(dir: &Path, mode: &str) -> Result<(), Error> {
    let dev = Default::default();
    let baseline = status_mib("VmRSS:");
    let t = Instant::now();
    let none = LoraPlan::none();
    let model: CausalLm<Flex> = match mode {
        "dense" => load_pretrained(dir, &none, &dev)?.1,
        "nf4" => {
            let q = Some(Nf4Options::default());
            load_pretrained_quantized(dir, &none, q, &mut InitRng::new(0), &dev)?.1
        }
        "old" => {
            let arch = read_arch(dir)?;
            let files = WeightFiles::open(dir)?;
            load_weights(
                CausalLm::new(&arch, &none, &mut InitRng::new(0), &dev),
                &files,
            )?
        }
        other => return Err(format!("mode {other:?}: use dense, nf4 or old").into()),
    };
    let secs = t.elapsed().as_secs_f64();
    let peak = status_mib("VmHWM:");
    let after = status_mib("VmRSS:");
    let mut lister = ParamLister::default();
    model.visit(&mut lister);
    let dense: usize = lister
        .params
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let q: Vec<_> = model.linears().filter_map(|l| l.nf4.as_ref()).collect();
    let q_params: usize = q.iter().map(|w| w.d_in * w.d_out).sum();
    let q_bytes: usize = q.iter().map(|w| w.storage_bytes()).sum();
    let params = dense + q_params;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let file = std::fs::metadata(dir.join("model.safetensors"))?.len() as usize;
    let resident = mib(4 * dense + q_bytes);
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "params": params,
            "file_mib": mib(file),
            "model_f32_mib": mib(4 * params),
            "model_resident_mib": resident,
            "baseline_rss_mib": baseline,
            "peak_rss_mib": peak,
            "rss_after_mib": after,
            "peak_minus_baseline_over_resident": (peak - baseline) / resident,
            "base_bits_per_param": (q_params > 0).then(|| 8.0 * q_bytes as f64 / q_params as f64),
            "load_secs": secs,
            "load_avg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        })
    );
    drop(model);
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["write", dir, dtype] => write(Path::new(dir), dtype),
        ["load", dir, mode] => load(Path::new(dir), mode),
        _ => Err("usage: load_memory write <dir> <f32|bf16> | load <dir> <dense|nf4|old>".into()),
    }
}
