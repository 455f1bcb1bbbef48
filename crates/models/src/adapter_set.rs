//! Named PEFT adapters held outside a model ([`AdapterSet`]): read from and written to PEFT
//! folders, and the linear layers of a model or architecture they can attach to.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use bellows_peft::{AdapterSet, Linear, LinearSite, LoraAdapter};
use burn::module::Param;
use burn::nn::DropoutConfig;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::hf::{peft_key, write_safetensors, WeightFiles};
use crate::{CausalLm, Error, ModelArch, Result};

const LINEARS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

/// Every linear layer of a model of this architecture, in module order (the seven per decoder
/// layer, then `lm_head` unless tied), without building the model.
pub fn linear_sites(arch: &ModelArch) -> Vec<LinearSite> {
    let (d, i) = (arch.hidden_size, arch.intermediate_size);
    let q = arch.num_attention_heads * arch.head_dim;
    let kv = arch.num_key_value_heads * arch.head_dim;
    let dims = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)];
    let mut out = Vec::new();
    for layer in 0..arch.num_hidden_layers {
        for ((block, name), (d_in, d_out)) in LINEARS.iter().zip(dims) {
            out.push(LinearSite {
                path: format!("model.layers.{layer}.{block}.{name}"),
                d_in,
                d_out,
                is_head: false,
            });
        }
    }
    if !arch.tie_word_embeddings {
        out.push(LinearSite {
            path: "lm_head".into(),
            d_in: d,
            d_out: arch.vocab_size,
            is_head: true,
        });
    }
    out
}

/// Every linear layer of `model` with its module path, in the order of [`linear_sites`].
pub(crate) fn linears_mut<B: Backend>(model: &mut CausalLm<B>) -> Vec<(String, &mut Linear<B>)> {
    let mut out = Vec::new();
    for (i, layer) in model.model.layers.iter_mut().enumerate() {
        let a = &mut layer.self_attn;
        let m = &mut layer.mlp;
        let ls = [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ];
        for ((block, name), l) in LINEARS.iter().zip(ls) {
            out.push((format!("model.layers.{i}.{block}.{name}"), l));
        }
    }
    if let Some(head) = model.lm_head.as_mut() {
        out.push(("lm_head".to_string(), head));
    }
    out
}

fn tensor<B: Backend, const D: usize>(
    files: &WeightFiles,
    key: &str,
    shape: [usize; D],
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    let h = files.read_f32(key, &shape)?;
    Ok(Tensor::from_data(
        TensorData::new(h.values, h.shape),
        device,
    ))
}

/// Reads the PEFT adapter folder `dir` (`adapter_config.json` + `adapter_model.safetensors`) as
/// an [`AdapterSet`] for a model whose linear layers are `sites`; the config decides which layers
/// are adapted and with which rank and scaling. The tensors are trainable.
///
/// # Errors
/// Unreadable files, a non-LoRA adapter, `modules_to_save` (full module copies are not kept per
/// adapter), or adapter tensors that are missing, mis-shaped, or belong to no adapted layer.
pub fn read_adapter_set<B: Backend>(
    dir: &Path,
    sites: &[LinearSite],
    device: &B::Device,
) -> Result<AdapterSet<B>> {
    let config = bellows_peft::read_adapter_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    if !config.modules_to_save.is_empty() {
        return Err(Error::Weights {
            path: file,
            tensor: "<modules_to_save>".into(),
            message: format!(
                "named adapters do not support modules_to_save {:?}; load it alone with load_pretrained_with_adapter",
                config.modules_to_save
            ),
        });
    }
    let plan = config.plan()?;
    let files = WeightFiles::open_file(&file)?;
    let mut used = HashSet::new();
    let mut layers = BTreeMap::new();
    for site in sites {
        let Some(spec) = plan.spec_for(&site.path, site.is_head) else {
            continue;
        };
        let key = |leaf: &str| peft_key(&format!("{}.lora.{leaf}", site.path));
        let (ka, kb) = (key("lora_a"), key("lora_b"));
        let a = tensor::<B, 2>(&files, &ka, [spec.r, site.d_in], device)?;
        let b = tensor::<B, 2>(&files, &kb, [site.d_out, spec.r], device)?;
        let magnitude = if spec.dora {
            let km = key("magnitude");
            let m = tensor::<B, 1>(&files, &km, [site.d_out], device)?;
            used.insert(km);
            Some(Param::from_tensor(m))
        } else {
            None
        };
        used.extend([ka, kb]);
        let adapter = LoraAdapter {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            magnitude,
            dropout: DropoutConfig::new(spec.dropout).init(),
            scale: spec.scale,
            alpha: spec.alpha,
        };
        layers.insert(site.path.clone(), adapter);
    }
    let mut unused: Vec<&str> = files.names().filter(|n| !used.contains(*n)).collect();
    unused.sort_unstable();
    if let Some(first) = unused.first() {
        return Err(Error::Weights {
            path: file,
            tensor: (*first).to_string(),
            message: format!(
                "not used by any adapted layer ({} such tensors; does adapter_config.json match the file?)",
                unused.len()
            ),
        });
    }
    Ok(AdapterSet { config, layers })
}

/// Writes `set` as a PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors`
/// (f32, PEFT keys), with `base_model_name_or_path = base`.
///
/// # Errors
/// The files cannot be written.
pub fn save_adapter_set<B: Backend>(set: &AdapterSet<B>, base: &str, dir: &Path) -> Result<()> {
    fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
        let shape = t.dims().to_vec();
        let v = t.into_data().convert::<f32>().to_vec::<f32>();
        (shape, v.unwrap_or_default())
    }
    let mut tensors = Vec::new();
    for (path, l) in &set.layers {
        let key = |leaf: &str| peft_key(&format!("{path}.lora.{leaf}"));
        let (shape, values) = host(l.lora_a.val());
        tensors.push((key("lora_a"), shape, values));
        let (shape, values) = host(l.lora_b.val());
        tensors.push((key("lora_b"), shape, values));
        if let Some(m) = &l.magnitude {
            let (shape, values) = host(m.val());
            tensors.push((key("magnitude"), shape, values));
        }
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let json = serde_json::to_string_pretty(&bellows_peft::adapter_config_json(&set.config, base))
        .unwrap_or_default();
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, json).map_err(|e| Error::Io { path, source: e })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny_arch;
    use bellows_peft::{InitRng, LoraPlan};
    use burn::backend::Flex;

    #[test]
    fn sites_of_an_architecture_match_the_model() {
        let arch = tiny_arch();
        let mut m = CausalLm::<Flex>::new(
            &arch,
            &LoraPlan::none(),
            &mut InitRng::new(0),
            &Default::default(),
        );
        let from_model: Vec<(String, usize, usize)> = linears_mut(&mut m)
            .into_iter()
            .map(|(p, l)| (p, l.d_in(), l.d_out()))
            .collect();
        let from_arch: Vec<(String, usize, usize)> = linear_sites(&arch)
            .into_iter()
            .map(|s| (s.path, s.d_in, s.d_out))
            .collect();
        assert_eq!(from_model, from_arch);
    }
}
