//! Named adapter sets and PEFT's weighted combination of adapters (`add_weighted_adapter`).
//!
//! PEFT's `"linear"` combination (peft 0.21 `LoraModel._generalized_task_arithmetic_weighted_adapter`)
//! combines the A and B matrices separately, each with the square root of `wᵢ·sᵢ` (`sᵢ` = adapter
//! i's scaling), the sign going to A only:
//!
//! `A = Σᵢ sign(wᵢ·sᵢ)·√|wᵢ·sᵢ|·Aᵢ`, `B = Σᵢ √|wᵢ·sᵢ|·Bᵢ`, summed over the adapters that have the
//! module. The new adapter has `r = lora_alpha =` the common rank (scaling 1, or √r with rsLoRA
//! inherited from the first adapter). `B·A` then holds the wanted `Σ wᵢ·sᵢ·Bᵢ·Aᵢ` plus cross terms
//! `√(wᵢsᵢwⱼsⱼ)·Bᵢ·Aⱼ`: PEFT documents it as "efficient but a very rough approximation".

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use burn::module::Param;
use burn::nn::DropoutConfig;
use burn::tensor::{backend::Backend, Tensor};

use crate::config::{PeftConfig, TargetModules};
use crate::linear::LoraAdapter;
use crate::{Error, Result};

/// One named adapter held outside a model: its config and one [`LoraAdapter`] per adapted linear
/// layer, keyed by module path (`model.layers.0.self_attn.q_proj`).
#[derive(Debug)]
pub struct AdapterSet<B: Backend> {
    /// The adapter's config (as in its `adapter_config.json`).
    pub config: PeftConfig,
    /// The adapter of every adapted linear layer, by module path.
    pub layers: BTreeMap<String, LoraAdapter<B>>,
}

/// A linear layer of a model as an adapter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSite {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// Whether it is the output head (`"all-linear"` skips it).
    pub is_head: bool,
}

/// How [`combine_adapters`] combines adapters. PEFT's other types (`svd`, `cat`, `ties`, ...) are
/// not implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Combination {
    /// PEFT's `"linear"`: A and B combined separately with √|w·s| weights (see the module doc).
    #[default]
    Linear,
}

impl FromStr for Combination {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Combination::Linear),
            other => Err(Error::Combine {
                message: format!(
                    "combination type {other:?} is not supported (bellows implements \"linear\")"
                ),
            }),
        }
    }
}

fn combine_err(message: impl Into<String>) -> Error {
    Error::Combine {
        message: message.into(),
    }
}

/// The rank PEFT uses for a linear combination: `r`, or the largest of `r` and the `rank_pattern` values.
fn peft_rank(cfg: &PeftConfig) -> usize {
    cfg.rank_pattern.values().copied().fold(cfg.r, usize::max)
}

fn leaf(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// The config of the combined adapter, as PEFT's `add_weighted_adapter` builds it: the first
/// adapter's config with `r` and `lora_alpha` set to the common rank, no rank/alpha patterns, and
/// `target_modules` the union of the adapters' (name lists and `"all-linear"`, expanded to the
/// layer names it adapted, are merged into a sorted list; regular expressions are joined with `|`).
///
/// # Errors
/// No adapters, DoRA or `modules_to_save` in an adapter, unequal ranks, or a mix of a regular
/// expression and name lists in `target_modules`.
pub fn combined_config<B: Backend>(sets: &[&AdapterSet<B>]) -> Result<PeftConfig> {
    let first = sets
        .first()
        .ok_or_else(|| combine_err("no adapters to combine"))?;
    for s in sets {
        if s.config.use_dora {
            return Err(combine_err("DoRA adapters cannot be combined linearly"));
        }
        if !s.config.modules_to_save.is_empty() {
            return Err(combine_err(format!(
                "adapters with modules_to_save ({:?}) cannot be combined",
                s.config.modules_to_save
            )));
        }
    }
    let ranks: BTreeSet<usize> = sets.iter().map(|s| peft_rank(&s.config)).collect();
    let rank = match ranks.iter().collect::<Vec<_>>()[..] {
        [r] => *r,
        _ => {
            return Err(combine_err(format!(
                "a linear combination needs equal ranks, got {ranks:?}"
            )))
        }
    };
    let regexes: Vec<&str> = sets
        .iter()
        .filter_map(|s| match &s.config.target_modules {
            TargetModules::Pattern(p) if p != "all-linear" => Some(p.as_str()),
            _ => None,
        })
        .collect();
    let target_modules = if regexes.len() == sets.len() {
        let parts: Vec<String> = regexes.iter().map(|p| format!("({p})")).collect();
        TargetModules::Pattern(parts.join("|"))
    } else if regexes.is_empty() {
        let mut names = BTreeSet::new();
        for s in sets {
            match &s.config.target_modules {
                TargetModules::Names(v) => names.extend(v.iter().cloned()),
                TargetModules::Pattern(_) => {
                    names.extend(s.layers.keys().map(|p| leaf(p).to_string()))
                }
            }
        }
        TargetModules::Names(names.into_iter().collect())
    } else {
        return Err(combine_err(
            "target_modules mix a regular expression and name lists, which PEFT cannot combine",
        ));
    };
    Ok(PeftConfig {
        r: rank,
        alpha: rank as f64,
        target_modules,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        ..first.config.clone()
    })
}

/// Combines named adapters with weights into a new adapter, as PEFT's
/// `add_weighted_adapter(adapters, weights, name, combination_type="linear")` does (formula in
/// the module doc). `sites` lists the model's linear layers; the new adapter covers those its
/// config ([`combined_config`]) targets. Negative weights subtract an adapter. The new tensors
/// do not require gradients (PEFT freezes the new adapter too).
///
/// # Errors
/// As [`combined_config`], plus a targeted layer that none of the adapters has, or adapters whose
/// tensors for one layer differ in shape.
pub fn combine_adapters<B: Backend>(
    parts: &[(&AdapterSet<B>, f64)],
    sites: &[LinearSite],
    combination: Combination,
) -> Result<AdapterSet<B>> {
    let Combination::Linear = combination;
    let sets: Vec<&AdapterSet<B>> = parts.iter().map(|(s, _)| *s).collect();
    let config = combined_config(&sets)?;
    let plan = config.plan()?;
    let mut layers = BTreeMap::new();
    for site in sites {
        let Some(spec) = plan.spec_for(&site.path, site.is_head) else {
            continue;
        };
        let mut sum: Option<(Tensor<B, 2>, Tensor<B, 2>)> = None;
        for (set, weight) in parts {
            let Some(l) = set.layers.get(&site.path) else {
                continue;
            };
            let ws = weight * l.scale;
            let root = ws.abs().sqrt();
            let a = l.lora_a.val().detach().mul_scalar(root * ws.signum());
            let b = l.lora_b.val().detach().mul_scalar(root);
            sum = Some(match sum {
                None => (a, b),
                Some((sa, sb)) => {
                    if sa.dims() != a.dims() || sb.dims() != b.dims() {
                        return Err(combine_err(format!(
                            "{}: adapter shapes differ (A {:?} vs {:?}, B {:?} vs {:?})",
                            site.path,
                            sa.dims(),
                            a.dims(),
                            sb.dims(),
                            b.dims()
                        )));
                    }
                    (sa + a, sb + b)
                }
            });
        }
        let (a, b) = sum.ok_or_else(|| {
            combine_err(format!(
                "{}: targeted by the combined config but adapted by none of the adapters",
                site.path
            ))
        })?;
        let adapter = LoraAdapter {
            lora_a: Param::from_tensor(a).set_require_grad(false),
            lora_b: Param::from_tensor(b).set_require_grad(false),
            magnitude: None,
            dropout: DropoutConfig::new(spec.dropout).init(),
            scale: spec.scale,
            alpha: spec.alpha,
        };
        layers.insert(site.path.clone(), adapter);
    }
    Ok(AdapterSet { config, layers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LoraInit, LoraSpec, Method};
    use crate::init::InitRng;
    use burn::backend::Flex;
    use burn::tensor::Tolerance;

    type B = Flex;

    fn set(alpha: f64, targets: &[&str], seed: u64) -> AdapterSet<B> {
        let config = PeftConfig {
            method: Method::Lora,
            r: 2,
            alpha,
            target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
            ..PeftConfig::default()
        };
        let spec = LoraSpec {
            r: 2,
            alpha,
            scale: alpha / 2.0,
            dropout: 0.0,
            dora: false,
            init: LoraInit::Gaussian,
        };
        let mut rng = InitRng::new(seed);
        let dev = Default::default();
        let layers = targets
            .iter()
            .map(|t| {
                let mut l = LoraAdapter::new(&spec, 3, 4, &mut rng, &dev);
                l.lora_b = Param::from_tensor(rng.normal([4, 2], 0.0, 1.0, &dev));
                (format!("m.{t}"), l)
            })
            .collect();
        AdapterSet { config, layers }
    }

    fn sites() -> Vec<LinearSite> {
        ["x", "y", "z"]
            .iter()
            .map(|n| LinearSite {
                path: format!("m.{n}"),
                d_in: 3,
                d_out: 4,
                is_head: false,
            })
            .collect()
    }

    #[test]
    fn one_adapter_with_weight_one_keeps_its_update() {
        let a = set(6.0, &["x"], 1);
        let c = combine_adapters(&[(&a, 1.0)], &sites(), Combination::Linear).expect("combines");
        assert_eq!((c.config.r, c.config.alpha), (2, 2.0));
        let got = c.layers["m.x"].delta().into_data();
        got.assert_approx_eq::<f32>(
            &a.layers["m.x"].delta().into_data(),
            Tolerance::absolute(1e-5),
        );
    }

    #[test]
    fn negative_weights_put_the_sign_on_a_and_targets_are_the_union() {
        let a = set(2.0, &["x"], 1);
        let b = set(4.0, &["x", "y"], 2);
        let c = combine_adapters(&[(&a, 1.0), (&b, -0.5)], &sites(), Combination::Linear)
            .expect("combines");
        assert_eq!(
            c.config.target_modules,
            TargetModules::Names(vec!["x".into(), "y".into()])
        );
        // y exists only in b: A = -√2·A_b, B = √2·B_b, so B·A = -2·B_b·A_b = -0.5·s_b·B_b·A_b.
        let want = b.layers["m.y"].delta().mul_scalar(-0.5).into_data();
        c.layers["m.y"]
            .delta()
            .into_data()
            .assert_approx_eq::<f32>(&want, Tolerance::absolute(1e-5));
        assert!(!c.layers.contains_key("m.z"));
    }

    #[test]
    fn unequal_ranks_and_dora_are_refused() {
        let a = set(2.0, &["x"], 1);
        let mut b = set(2.0, &["x"], 2);
        b.config.rank_pattern.insert("x".into(), 4);
        let e = combine_adapters(&[(&a, 1.0), (&b, 1.0)], &sites(), Combination::Linear)
            .expect_err("ranks differ");
        assert!(e.to_string().contains("equal ranks"), "{e}");
        b.config.rank_pattern.clear();
        b.config.use_dora = true;
        let e = combine_adapters(&[(&a, 1.0), (&b, 1.0)], &sites(), Combination::Linear)
            .expect_err("dora");
        assert!(e.to_string().contains("DoRA"), "{e}");
        assert!("svd".parse::<Combination>().is_err());
    }
}
