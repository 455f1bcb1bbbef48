//! Several named adapters on one model, one of them active (PEFT's multi-adapter `PeftModel` API:
//! `load_adapter(dir, name)`, `set_adapter`, `delete_adapter`, `active_adapter`,
//! `add_weighted_adapter`).
//!
//! Only the active adapter sits in the model's [`bellows_peft::Linear`] layers, so the forward pass
//! is the single-adapter one; inactive adapters are parked as [`AdapterSet`]s and cost no compute.
//! Switching moves tensor handles, it copies no weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bellows_peft::{
    combine_adapters, AdapterSet, Combination, InitRng, LinearSite, LoraPlan, Nf4Options,
    PeftConfig,
};
use burn::tensor::backend::Backend;

use crate::adapter_set::{linears_mut, read_adapter_set, save_adapter_set};
use crate::{load_pretrained_quantized, CausalLm, Error, ModelArch, Result};

/// Loads the base folder `base` and the PEFT adapter folders `adapters`, combined with `weights`
/// into one active adapter (PEFT's `load_adapter` for each, `add_weighted_adapter`, `set_adapter`).
///
/// # Errors
/// As [`crate::load_pretrained`], [`PeftModel::load_adapter`] and [`PeftModel::add_weighted_adapter`].
pub fn load_pretrained_with_weighted_adapters<B: Backend>(
    base: &Path,
    adapters: &[PathBuf],
    weights: &[f64],
    combination: Combination,
    device: &B::Device,
) -> Result<(ModelArch, CausalLm<B>)> {
    load_pretrained_with_weighted_adapters_quantized(
        base,
        adapters,
        weights,
        combination,
        None,
        device,
    )
}

/// [`load_pretrained_with_weighted_adapters`] on a base whose decoder linears are NF4-quantized as
/// they are read, when `quantize` is set.
///
/// # Errors
/// As [`load_pretrained_with_weighted_adapters`].
pub fn load_pretrained_with_weighted_adapters_quantized<B: Backend>(
    base: &Path,
    adapters: &[PathBuf],
    weights: &[f64],
    combination: Combination,
    quantize: Option<Nf4Options>,
    device: &B::Device,
) -> Result<(ModelArch, CausalLm<B>)> {
    let none = LoraPlan::none();
    let (arch, model) =
        load_pretrained_quantized::<B>(base, &none, quantize, &mut InitRng::new(0), device)?;
    let mut m = PeftModel::new(model);
    let names: Vec<String> = (0..adapters.len())
        .map(|i| format!("adapter_{i}"))
        .collect();
    for (dir, name) in adapters.iter().zip(&names) {
        m.load_adapter(dir, name)?;
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    m.add_weighted_adapter(&names, weights, "combined", combination)?;
    m.set_adapter("combined")?;
    Ok((arch, m.into_model()))
}

/// A model with named adapters, at most one active. See the module documentation.
///
/// ```
/// use bellows_models::{tiny_arch, CausalLm, PeftModel};
/// use bellows_peft::{InitRng, LoraPlan};
/// use burn::backend::Flex;
/// let base = CausalLm::<Flex>::new(&tiny_arch(), &LoraPlan::none(), &mut InitRng::new(0), &Default::default());
/// let model = PeftModel::new(base);
/// assert_eq!(model.active_adapter(), None);
/// ```
#[derive(Debug)]
pub struct PeftModel<B: Backend> {
    model: CausalLm<B>,
    sites: Vec<LinearSite>,
    active: Option<(String, PeftConfig)>,
    parked: BTreeMap<String, AdapterSet<B>>,
}

fn adapter_err(name: &str, message: impl Into<String>) -> Error {
    Error::Adapter {
        name: name.to_string(),
        message: message.into(),
    }
}

impl<B: Backend> PeftModel<B> {
    /// Wraps a base model. Adapters it already carries are dropped (merge them first to keep them).
    pub fn new(model: CausalLm<B>) -> Self {
        let mut model = model.unmerge_adapters();
        let sites = linears_mut(&mut model)
            .into_iter()
            .map(|(path, l)| {
                l.lora = None;
                LinearSite {
                    is_head: path == "lm_head",
                    d_in: l.d_in(),
                    d_out: l.d_out(),
                    path,
                }
            })
            .collect();
        PeftModel {
            model,
            sites,
            active: None,
            parked: BTreeMap::new(),
        }
    }

    /// The model with the active adapter attached (run its `forward`).
    pub fn model(&self) -> &CausalLm<B> {
        &self.model
    }

    /// The model with the active adapter attached; the inactive adapters are dropped.
    pub fn into_model(self) -> CausalLm<B> {
        self.model
    }

    /// The model's linear layers (where adapters can attach).
    pub fn sites(&self) -> &[LinearSite] {
        &self.sites
    }

    /// The name of the active adapter, if any.
    pub fn active_adapter(&self) -> Option<&str> {
        self.active.as_ref().map(|(n, _)| n.as_str())
    }

    /// Every adapter name, sorted.
    pub fn adapter_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.parked.keys().map(String::as_str).collect();
        v.extend(self.active_adapter());
        v.sort_unstable();
        v
    }

    /// The config of adapter `name`.
    pub fn config(&self, name: &str) -> Option<&PeftConfig> {
        match &self.active {
            Some((n, c)) if n == name => Some(c),
            _ => self.parked.get(name).map(|s| &s.config),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.config(name).is_some()
    }

    /// Adds an adapter under `name`; it becomes active when no adapter is (as with PEFT's
    /// `from_pretrained` then `load_adapter`).
    ///
    /// # Errors
    /// The name is taken, or the set adapts a layer the model does not have.
    pub fn add_adapter(&mut self, name: &str, set: AdapterSet<B>) -> Result<()> {
        if self.contains(name) {
            return Err(adapter_err(name, "an adapter of this name exists"));
        }
        if let Some(p) = set
            .layers
            .keys()
            .find(|p| !self.sites.iter().any(|s| &s.path == *p))
        {
            return Err(adapter_err(
                name,
                format!("adapts {p}, which the model lacks"),
            ));
        }
        self.parked.insert(name.to_string(), set);
        if self.active.is_none() {
            self.attach(name);
        }
        Ok(())
    }

    /// Reads the PEFT adapter folder `dir` and adds it under `name` (see [`PeftModel::add_adapter`]).
    ///
    /// # Errors
    /// As [`crate::read_adapter_set`] and [`PeftModel::add_adapter`].
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        if self.contains(name) {
            return Err(adapter_err(name, "an adapter of this name exists"));
        }
        let device = self.model.model.embed_tokens.weight.device();
        let set = read_adapter_set(dir, &self.sites, &device)?;
        self.add_adapter(name, set)
    }

    /// Makes `name` the active adapter (the only one computed in `forward`).
    ///
    /// # Errors
    /// No adapter of that name.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        if !self.contains(name) {
            return Err(adapter_err(name, "no adapter of this name"));
        }
        if self.active_adapter() != Some(name) {
            self.park();
            self.attach(name);
        }
        Ok(())
    }

    /// Deletes adapter `name`. When it was active, the first remaining adapter by name becomes
    /// active (PEFT's rule), or none.
    ///
    /// # Errors
    /// No adapter of that name.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if !self.contains(name) {
            return Err(adapter_err(name, "no adapter of this name"));
        }
        if self.active_adapter() == Some(name) {
            self.park();
            if let Some(next) = self.parked.keys().find(|n| *n != name).cloned() {
                self.attach(&next);
            }
        }
        self.parked.remove(name);
        Ok(())
    }

    /// Combines adapters `names` with `weights` into a new adapter `new_name` (PEFT's
    /// `add_weighted_adapter`; formula in [`bellows_peft::combine_adapters`]). The active adapter
    /// does not change.
    ///
    /// # Errors
    /// `new_name` exists, an unknown name, `names` and `weights` of different lengths, or
    /// adapters that cannot be combined (DoRA, unequal ranks, ...).
    pub fn add_weighted_adapter(
        &mut self,
        names: &[&str],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
    ) -> Result<()> {
        if self.contains(new_name) {
            return Err(adapter_err(new_name, "an adapter of this name exists"));
        }
        if names.len() != weights.len() {
            return Err(adapter_err(
                new_name,
                format!("{} adapters but {} weights", names.len(), weights.len()),
            ));
        }
        if let Some(missing) = names.iter().find(|n| !self.contains(n)) {
            return Err(adapter_err(missing, "no adapter of this name"));
        }
        let active = self.active_adapter().map(str::to_string);
        self.park();
        let parts: Vec<(&AdapterSet<B>, f64)> = names
            .iter()
            .zip(weights)
            .map(|(n, w)| (&self.parked[*n], *w))
            .collect();
        let combined = combine_adapters(&parts, &self.sites, combination);
        if let Some(a) = &active {
            self.attach(a);
        }
        self.parked.insert(new_name.to_string(), combined?);
        Ok(())
    }

    /// Writes adapter `name` as a PEFT folder (`base` becomes `base_model_name_or_path`).
    ///
    /// # Errors
    /// No adapter of that name, or the files cannot be written.
    pub fn save_adapter(&mut self, name: &str, base: &str, dir: &Path) -> Result<()> {
        if !self.contains(name) {
            return Err(adapter_err(name, "no adapter of this name"));
        }
        let active = self.active_adapter().map(str::to_string);
        self.park();
        let res = save_adapter_set(&self.parked[name], base, dir);
        if let Some(a) = &active {
            self.attach(a);
        }
        res
    }

    /// Folds the active adapter into the base weights and returns the plain model (PEFT's
    /// `merge_and_unload`); the inactive adapters are dropped.
    pub fn merge_and_unload(self) -> CausalLm<B> {
        self.model.merge_adapters()
    }

    /// Moves the active adapter's layers out of the model into `parked`.
    fn park(&mut self) {
        let Some((name, config)) = self.active.take() else {
            return;
        };
        let layers = linears_mut(&mut self.model)
            .into_iter()
            .filter_map(|(path, l)| l.lora.take().map(|a| (path, a)))
            .collect();
        self.parked.insert(name, AdapterSet { config, layers });
    }

    /// Moves parked adapter `name` into the model; nothing may be active.
    fn attach(&mut self, name: &str) {
        let Some(mut set) = self.parked.remove(name) else {
            return;
        };
        for (path, l) in linears_mut(&mut self.model) {
            l.lora = set.layers.remove(&path);
        }
        self.active = Some((name.to_string(), set.config));
    }
}
