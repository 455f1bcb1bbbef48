//! Loading weights into a [`CausalLm`] by parameter path, and saving models and adapters.

use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::{Dtype, View};

use super::config::{parse_config, to_config_json};
use super::source::CheckpointSource;
use super::weights::WeightFiles;
use crate::config::ModelArch;
use crate::params::is_adapter_path;
use crate::{CausalLm, Error, Result};
use bellows_peft::{InitRng, LoraPlan, Nf4Options, PeftConfig, ShardGroup};

/// Reads and parses `<dir>/config.json`.
///
/// # Errors
/// Unreadable, malformed or unsupported config, naming the key.
pub fn read_arch(dir: &Path) -> Result<ModelArch> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Io {
        path: cfg_path.clone(),
        source: e,
    })?;
    parse_config(&cfg_path, &text)
}

/// Reads `<dir>/config.json` and the weights into a model with adapters per `plan`; new
/// adapters are initialised from `rng`.
///
/// Each parameter is built once, directly from its memory-mapped tensor (no random init that is
/// then overwritten), and the file pages of a tensor are released once it is converted, so peak
/// memory stays near the size of the model itself. Linears saved in bitsandbytes' 4-bit format
/// load as NF4.
///
/// # Errors
/// Unreadable or unsupported config, missing or mis-shaped tensors, corrupt files.
pub fn load_pretrained_with<B: Backend>(
    dir: &Path,
    plan: &LoraPlan,
    rng: &mut InitRng,
    device: &B::Device,
) -> Result<(ModelArch, CausalLm<B>)> {
    load_pretrained_quantized(dir, plan, None, rng, device)
}

/// [`load_pretrained_with`] that NF4-quantizes every decoder linear (not `lm_head`, embeddings,
/// norms or `modules_to_save`) as it is read, when `quantize` is set: the full-precision model
/// never exists, only one tensor of it at a time.
///
/// # Errors
/// As [`load_pretrained_with`].
pub fn load_pretrained_quantized<B: Backend>(
    dir: &Path,
    plan: &LoraPlan,
    quantize: Option<Nf4Options>,
    rng: &mut InitRng,
    device: &B::Device,
) -> Result<(ModelArch, CausalLm<B>)> {
    load_pretrained_sharded(dir, plan, quantize, None, rng, device)
}

/// [`load_pretrained_quantized`] for FSDP: with a `shard` group, each sharded weight
/// ([`crate::ShardingSource`]) keeps only this rank's rows as soon as it is read, so no rank ever
/// holds the whole model.
///
/// # Errors
/// As [`load_pretrained_with`].
pub fn load_pretrained_sharded<B: Backend>(
    dir: &Path,
    plan: &LoraPlan,
    quantize: Option<Nf4Options>,
    shard: Option<&ShardGroup>,
    rng: &mut InitRng,
    device: &B::Device,
) -> Result<(ModelArch, CausalLm<B>)> {
    let arch = read_arch(dir)?;
    let files = WeightFiles::open(dir)?;
    let mut src = CheckpointSource {
        files: &files,
        quantize,
        device,
    };
    let model = CausalLm::build_sharded(&arch, plan, &mut src, shard, rng)?;
    Ok((arch, model))
}

/// [`load_pretrained_with`] with a fixed adapter-init seed (0).
///
/// # Errors
/// As [`load_pretrained_with`].
pub fn load_pretrained<B: Backend>(
    dir: &Path,
    plan: &LoraPlan,
    device: &B::Device,
) -> Result<(ModelArch, CausalLm<B>)> {
    load_pretrained_with(dir, plan, &mut InitRng::new(0), device)
}

/// Replaces every non-adapter parameter of `model` with the tensor of the same path in `files`
/// (converted to f32), keeping parameter ids and trainability.
///
/// # Errors
/// A tensor is missing, mis-shaped or of an unsupported dtype.
pub fn load_weights<B: Backend>(model: CausalLm<B>, files: &WeightFiles) -> Result<CausalLm<B>> {
    struct Loader<'a> {
        files: &'a WeightFiles,
        stack: Vec<String>,
        err: Option<Error>,
    }
    impl<B: Backend> ModuleMapper<B> for Loader<'_> {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.pop();
        }
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let path = self.stack.join(".");
            if self.err.is_some() || is_adapter_path(&path) {
                return p;
            }
            match read_param(self.files, &path, &p) {
                Ok(new) => new,
                Err(e) => {
                    self.err = Some(e);
                    p
                }
            }
        }
    }
    let mut l = Loader {
        files,
        stack: Vec::new(),
        err: None,
    };
    let model = model.map(&mut l);
    match l.err {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

/// A new parameter with `p`'s id, device and trainability holding tensor `key` of `files`
/// (converted to f32, shape checked against `p`).
///
/// # Errors
/// The tensor is missing, mis-shaped or of an unsupported dtype.
pub(crate) fn read_param<B: Backend, const D: usize>(
    files: &WeightFiles,
    key: &str,
    p: &Param<Tensor<B, D>>,
) -> Result<Param<Tensor<B, D>>> {
    let shape = p.lazy_shape().dims::<D>().to_vec();
    let h = files.read_f32(key, &shape)?;
    let device = p.val().device();
    let t = Tensor::<B, D>::from_data(TensorData::new(h.values, h.shape), &device);
    Ok(Param::initialized(p.id, t).set_require_grad(p.is_require_grad()))
}

/// Every float parameter as `(path, shape, f32 values)`, in module order; adapter tensors are
/// included only when `adapters` is true, and then only they.
pub fn state_dict<B: Backend, M: Module<B>>(
    model: &M,
    adapters: bool,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    struct Collect {
        stack: Vec<String>,
        adapters: bool,
        out: Vec<(String, Vec<usize>, Vec<f32>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let path = self.stack.join(".");
            if is_adapter_path(&path) != self.adapters {
                return;
            }
            let t = p.val();
            let shape = t.dims().to_vec();
            let values = t
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default();
            self.out.push((path, shape, values));
        }
    }
    let mut c = Collect {
        stack: Vec::new(),
        adapters,
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

struct F32View<'a> {
    shape: &'a [usize],
    bytes: Vec<u8>,
}

impl View for &F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes f32 tensors to a safetensors file atomically (temp file, fsync, rename).
///
/// # Errors
/// The file cannot be written.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let views: Vec<(String, F32View<'_>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                F32View {
                    shape: s,
                    bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                },
            )
        })
        .collect();
    let refs: Vec<(&str, &F32View<'_>)> = views.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(refs, Some(meta)).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        tensor: "<all>".into(),
        message: e.to_string(),
    })?;
    atomic_write(path, &bytes)
}

/// Writes `bytes` to `path` via a temporary file in the same folder, fsync and rename.
///
/// # Errors
/// Any I/O failure, naming the path.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Saves a full model as a Hugging Face folder: `config.json` + `model.safetensors` (f32).
/// Adapters, if any, are not included (merge them first to bake them in).
///
/// # Errors
/// The files cannot be written.
pub fn save_pretrained<B: Backend>(
    model: &CausalLm<B>,
    arch: &ModelArch,
    dir: &Path,
) -> Result<()> {
    if model.is_quantized() {
        return Err(Error::Weights {
            path: dir.to_path_buf(),
            tensor: "<model>".into(),
            message: "the model has NF4-quantized layers; saving 4-bit checkpoints is not supported (save the adapter, or merge onto the unquantized base)".into(),
        });
    }
    let tensors = state_dict(model, false);
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let cfg = serde_json::to_string_pretty(&to_config_json(arch, "float32")).unwrap_or_default();
    atomic_write(&dir.join("config.json"), cfg.as_bytes())
}

/// The PEFT key of an adapter parameter path: `model.layers.0.self_attn.q_proj.lora.lora_a`
/// becomes `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(path: &str) -> String {
    let (module, leaf) = path.rsplit_once(".lora.").unwrap_or((path, ""));
    let suffix = match leaf {
        "lora_a" => "lora_A.weight",
        "lora_b" => "lora_B.weight",
        "magnitude" => "lora_magnitude_vector",
        other => other,
    };
    format!("base_model.model.{module}.{suffix}")
}

/// Saves the adapters of `model` in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`,
/// including the full copies of `cfg.modules_to_save` (key `base_model.model.<param path>`, as PEFT).
///
/// # Errors
/// The files cannot be written.
pub fn save_adapter<B: Backend>(
    model: &CausalLm<B>,
    cfg: &PeftConfig,
    base: &str,
    dir: &Path,
) -> Result<()> {
    let plan = cfg.plan()?;
    // `modules_to_save` copies go in as PEFT writes them: `base_model.model.<param path>`.
    let saved = state_dict(model, false)
        .into_iter()
        .filter(|(p, _, _)| plan.is_module_to_save(p))
        .map(|(p, s, v)| (format!("base_model.model.{p}"), s, v));
    let tensors: Vec<_> = state_dict(model, true)
        .into_iter()
        .map(|(p, s, v)| (peft_key(&p), s, v))
        .chain(saved)
        .collect();
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let json = serde_json::to_string_pretty(&bellows_peft::adapter_config_json(cfg, base))
        .unwrap_or_default();
    atomic_write(&dir.join("adapter_config.json"), json.as_bytes())
}
