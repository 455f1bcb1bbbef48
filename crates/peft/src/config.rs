//! The `[peft]` section of a job file and its resolution into a [`LoraPlan`].
//!
//! Names follow PEFT's `LoraConfig` (`r`, `alpha` ↔ `lora_alpha`, `dropout` ↔ `lora_dropout`,
//! `target_modules`, ...); the mapping to `adapter_config.json` keys lives in `io.rs`.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::nf4::QuantConfig;

/// How the model is fine-tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Full fine-tuning: every parameter trains.
    #[default]
    None,
    /// LoRA adapters on a frozen base (rsLoRA and DoRA are options of it).
    Lora,
    /// LoRA adapters on a frozen, 4-bit NF4-quantized base.
    Qlora,
}

/// Initialisation of new adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// PEFT's default: A kaiming-uniform (a = √5, i.e. U(±1/√in)), B zero, so a new adapter is a no-op.
    #[default]
    Default,
    /// A ~ N(0, 1/r), B zero.
    Gaussian,
}

/// Which linear layers get adapters: a list of names, `"all-linear"`, or a regular expression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches when its path equals a name or ends with `.<name>`.
    Names(Vec<String>),
    /// `"all-linear"` (every linear layer except the output head) or a regex that must match the whole path.
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}

/// `[peft]`: the fine-tuning method and its LoRA options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeftConfig {
    /// `"none"` (full fine-tune, the default), `"lora"` or `"qlora"`.
    #[serde(default)]
    pub method: Method,
    /// LoRA rank, >= 1. Default 8.
    #[serde(default = "default_r")]
    pub r: usize,
    /// LoRA alpha; the adapter is scaled by alpha / r (alpha / √r with `use_rslora`). Default 16.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout probability on the adapter's input, in [0, 1). Default 0.
    #[serde(default)]
    pub dropout: f64,
    /// Layers to adapt. Default `["q_proj", "v_proj"]`.
    #[serde(default)]
    pub target_modules: TargetModules,
    /// Names (same matching as a target list) never adapted. Default empty.
    #[serde(default)]
    pub exclude_modules: Vec<String>,
    /// Only these decoder layer indices get adapters; empty means all. Default empty.
    #[serde(default)]
    pub layers_to_transform: Vec<usize>,
    /// Per-module rank overrides: regex (searched in the module path) → rank.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides: regex (searched in the module path) → alpha.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Scale by alpha / √r instead of alpha / r (rsLoRA, Kalajdzievski 2023). Default false.
    #[serde(default)]
    pub use_rslora: bool,
    /// Weight-decomposed LoRA (DoRA, Liu et al. 2024). Default false.
    #[serde(default)]
    pub use_dora: bool,
    /// Adapter initialisation. Default `"default"`.
    #[serde(default)]
    pub init: LoraInit,
    /// Modules trained in full next to the adapters (e.g. `"lm_head"`). Default empty.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// `[peft.quantization]`: how `method = "qlora"` quantizes the base; only allowed with that
    /// method. Default (when absent): NF4, block size 64, double quantization.
    #[serde(default)]
    pub quantization: Option<QuantConfig>,
}

impl Default for PeftConfig {
    fn default() -> Self {
        PeftConfig {
            method: Method::None,
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: TargetModules::default(),
            exclude_modules: Vec::new(),
            layers_to_transform: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            use_dora: false,
            init: LoraInit::Default,
            modules_to_save: Vec::new(),
            quantization: None,
        }
    }
}

impl PeftConfig {
    /// The quantization of the base: `Some` exactly for `method = "qlora"` (the configured
    /// `[peft.quantization]` or its defaults).
    pub fn quant_config(&self) -> Option<QuantConfig> {
        (self.method == Method::Qlora).then(|| self.quantization.clone().unwrap_or_default())
    }

    /// Pushes every problem as `(dotted key, message)`; `at` is the section prefix (`"peft"`).
    pub fn validate(&self, at: &str, out: &mut Vec<(String, String)>) {
        let key = |k: &str| format!("{at}.{k}");
        if self.r == 0 {
            out.push((key("r"), "must be >= 1, got 0".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            out.push((key("alpha"), format!("must be > 0, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            out.push((
                key("dropout"),
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if let TargetModules::Pattern(p) = &self.target_modules {
            if p != "all-linear" {
                if let Err(e) = Regex::new(&format!("^(?:{p})$")) {
                    out.push((key("target_modules"), format!("invalid regex {p:?}: {e}")));
                }
            }
        }
        if let TargetModules::Names(v) = &self.target_modules {
            if v.is_empty() {
                out.push((
                    key("target_modules"),
                    "must name at least one module".into(),
                ));
            }
        }
        for (p, r) in &self.rank_pattern {
            if let Err(e) = Regex::new(p) {
                out.push((key("rank_pattern"), format!("invalid regex {p:?}: {e}")));
            }
            if *r == 0 {
                out.push((
                    key(&format!("rank_pattern.{p}")),
                    "must be >= 1, got 0".into(),
                ));
            }
        }
        for (p, a) in &self.alpha_pattern {
            if let Err(e) = Regex::new(p) {
                out.push((key("alpha_pattern"), format!("invalid regex {p:?}: {e}")));
            }
            if !(a.is_finite() && *a > 0.0) {
                out.push((
                    key(&format!("alpha_pattern.{p}")),
                    format!("must be > 0, got {a}"),
                ));
            }
        }
        match (&self.quantization, self.method) {
            (Some(q), Method::Qlora) => q.validate(&key("quantization"), out),
            (Some(_), m) => out.push((
                key("quantization"),
                format!("only used with method = \"qlora\", got {m:?}").to_lowercase(),
            )),
            (None, _) => {}
        }
    }

    /// Resolves the options into a plan that decides, per module path, whether and how to adapt it.
    ///
    /// # Errors
    /// Invalid regular expressions (already reported by [`PeftConfig::validate`]).
    pub fn plan(&self) -> crate::Result<LoraPlan> {
        LoraPlan::new(self)
    }
}

/// The adapter shape chosen for one linear layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSpec {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// The factor applied to B·A·x: alpha / r, or alpha / √r for rsLoRA.
    pub scale: f64,
    /// Dropout probability on the adapter input.
    pub dropout: f64,
    /// DoRA magnitude vector on.
    pub dora: bool,
    /// Initialisation.
    pub init: LoraInit,
}

/// A resolved [`PeftConfig`]: answers "does this module get an adapter, with which rank?".
#[derive(Debug, Clone)]
pub struct LoraPlan {
    method: Method,
    targets: Targets,
    exclude: Vec<String>,
    layers: Vec<usize>,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
    base: LoraSpec,
    rslora: bool,
    modules_to_save: Vec<String>,
}

#[derive(Debug, Clone)]
enum Targets {
    Names(Vec<String>),
    AllLinear,
    Regex(Regex),
}

fn name_matches(path: &str, name: &str) -> bool {
    path == name || path.ends_with(&format!(".{name}"))
}

fn compile(key: &str, pattern: &str, anchored: bool) -> crate::Result<Regex> {
    let full = if anchored {
        format!("^(?:{pattern})$")
    } else {
        pattern.to_string()
    };
    Regex::new(&full).map_err(|e| crate::Error::Regex {
        key: key.into(),
        pattern: pattern.into(),
        message: e.to_string(),
    })
}

impl LoraPlan {
    fn new(cfg: &PeftConfig) -> crate::Result<Self> {
        let targets = match &cfg.target_modules {
            TargetModules::Names(v) => Targets::Names(v.clone()),
            TargetModules::Pattern(p) if p == "all-linear" => Targets::AllLinear,
            TargetModules::Pattern(p) => Targets::Regex(compile("peft.target_modules", p, true)?),
        };
        let rank_pattern = cfg
            .rank_pattern
            .iter()
            .map(|(p, r)| Ok((compile("peft.rank_pattern", p, false)?, *r)))
            .collect::<crate::Result<_>>()?;
        let alpha_pattern = cfg
            .alpha_pattern
            .iter()
            .map(|(p, a)| Ok((compile("peft.alpha_pattern", p, false)?, *a)))
            .collect::<crate::Result<_>>()?;
        Ok(LoraPlan {
            method: cfg.method,
            targets,
            exclude: cfg.exclude_modules.clone(),
            layers: cfg.layers_to_transform.clone(),
            rank_pattern,
            alpha_pattern,
            base: LoraSpec {
                r: cfg.r,
                alpha: cfg.alpha,
                scale: 0.0,
                dropout: cfg.dropout,
                dora: cfg.use_dora,
                init: cfg.init,
            },
            rslora: cfg.use_rslora,
            modules_to_save: cfg.modules_to_save.clone(),
        })
    }

    /// A plan that adapts nothing (full fine-tuning).
    pub fn none() -> Self {
        LoraPlan {
            method: Method::None,
            targets: Targets::Names(Vec::new()),
            exclude: Vec::new(),
            layers: Vec::new(),
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            base: LoraSpec {
                r: 1,
                alpha: 1.0,
                scale: 1.0,
                dropout: 0.0,
                dora: false,
                init: LoraInit::Default,
            },
            rslora: false,
            modules_to_save: Vec::new(),
        }
    }

    /// The fine-tuning method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// Whether adapters are used at all (the base is then frozen).
    pub fn uses_adapters(&self) -> bool {
        self.method != Method::None
    }

    /// The adapter for the linear layer at `path` (an HF module path such as
    /// `model.layers.3.self_attn.q_proj`), or `None` if it stays plain.
    /// `is_output_head` excludes `lm_head` from `"all-linear"`, as PEFT does.
    pub fn spec_for(&self, path: &str, is_output_head: bool) -> Option<LoraSpec> {
        if !self.uses_adapters() {
            return None;
        }
        let targeted = match &self.targets {
            Targets::Names(v) => v.iter().any(|n| name_matches(path, n)),
            Targets::AllLinear => !is_output_head,
            Targets::Regex(re) => re.is_match(path),
        };
        if !targeted || self.exclude.iter().any(|n| name_matches(path, n)) {
            return None;
        }
        if !self.layers.is_empty() {
            match layer_index(path) {
                Some(i) if self.layers.contains(&i) => {}
                _ => return None,
            }
        }
        let mut spec = self.base;
        if let Some((_, r)) = self.rank_pattern.iter().find(|(re, _)| re.is_match(path)) {
            spec.r = *r;
        }
        if let Some((_, a)) = self.alpha_pattern.iter().find(|(re, _)| re.is_match(path)) {
            spec.alpha = *a;
        }
        spec.scale = if self.rslora {
            spec.alpha / (spec.r as f64).sqrt()
        } else {
            spec.alpha / spec.r as f64
        };
        Some(spec)
    }

    /// Whether some modules are trained in full next to the adapters (`modules_to_save`).
    pub fn has_modules_to_save(&self) -> bool {
        !self.modules_to_save.is_empty()
    }

    /// Whether the module at `path` (or the module owning the parameter at `path`, such as
    /// `lm_head.weight`) is trained in full next to the adapters (`modules_to_save`).
    pub fn is_module_to_save(&self, path: &str) -> bool {
        let owner = path.rsplit_once('.').map(|(m, _)| m);
        self.modules_to_save
            .iter()
            .any(|n| name_matches(path, n) || owner.is_some_and(|m| name_matches(m, n)))
    }
}

/// The decoder layer index in a path like `model.layers.12.mlp.up_proj`.
pub fn layer_index(path: &str) -> Option<usize> {
    let mut parts = path.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "h" || p == "blocks" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(f: impl FnOnce(&mut PeftConfig)) -> LoraPlan {
        let mut c = PeftConfig {
            method: Method::Lora,
            ..PeftConfig::default()
        };
        f(&mut c);
        c.plan().expect("valid test config")
    }

    #[test]
    fn names_match_suffixes_only_at_dots() {
        let p = lora(|_| {});
        assert!(p
            .spec_for("model.layers.0.self_attn.q_proj", false)
            .is_some());
        assert!(p
            .spec_for("model.layers.0.self_attn.k_proj", false)
            .is_none());
        assert!(p
            .spec_for("model.layers.0.self_attn.xq_proj", false)
            .is_none());
    }

    #[test]
    fn all_linear_skips_the_output_head() {
        let p = lora(|c| c.target_modules = TargetModules::Pattern("all-linear".into()));
        assert!(p.spec_for("lm_head", true).is_none());
        assert!(p.spec_for("model.layers.1.mlp.down_proj", false).is_some());
    }

    #[test]
    fn regex_layers_patterns_and_rslora_resolve() {
        let p = lora(|c| {
            c.target_modules = TargetModules::Pattern(r".*\.(q|v)_proj".into());
            c.layers_to_transform = vec![1];
            c.rank_pattern.insert("v_proj".into(), 4);
            c.use_rslora = true;
        });
        assert!(p
            .spec_for("model.layers.0.self_attn.q_proj", false)
            .is_none());
        let q = p
            .spec_for("model.layers.1.self_attn.q_proj", false)
            .expect("targeted");
        assert_eq!((q.r, q.scale), (8, 16.0 / 8f64.sqrt()));
        let v = p
            .spec_for("model.layers.1.self_attn.v_proj", false)
            .expect("targeted");
        assert_eq!((v.r, v.scale), (4, 8.0));
    }

    #[test]
    fn validation_reports_every_problem_with_its_key() {
        let c = PeftConfig {
            r: 0,
            alpha: -1.0,
            dropout: 1.5,
            target_modules: TargetModules::Pattern("(".into()),
            ..PeftConfig::default()
        };
        let mut out = Vec::new();
        c.validate("peft", &mut out);
        let keys: Vec<_> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "peft.r",
                "peft.alpha",
                "peft.dropout",
                "peft.target_modules"
            ]
        );
    }

    #[test]
    fn modules_to_save_match_modules_and_their_parameters() {
        let p = lora(|c| c.modules_to_save = vec!["lm_head".into()]);
        assert!(p.is_module_to_save("lm_head"));
        assert!(p.is_module_to_save("lm_head.weight"));
        assert!(!p.is_module_to_save("model.embed_tokens.weight"));
    }

    #[test]
    fn layer_index_reads_decoder_paths() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj"), Some(12));
        assert_eq!(layer_index("lm_head"), None);
    }
}
