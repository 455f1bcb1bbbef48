//! Walking a model's parameters by Hugging Face path: listing, freezing, merging.

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};

/// One parameter as seen from outside: its dotted path, shape and whether it trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Dotted module path, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub path: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Whether it requires gradients.
    pub trainable: bool,
}

/// Collects [`ParamInfo`] for every float parameter.
#[derive(Debug, Default)]
pub struct ParamLister {
    stack: Vec<String>,
    /// The parameters found, in module order.
    pub params: Vec<ParamInfo>,
}

impl<B: Backend> ModuleVisitor<B> for ParamLister {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.params.push(ParamInfo {
            path: self.stack.join("."),
            shape: param.lazy_shape().dims::<D>().to_vec(),
            trainable: param.is_require_grad(),
        });
    }
}

/// Whether `path` belongs to a LoRA adapter (`...q_proj.lora.lora_a`).
pub fn is_adapter_path(path: &str) -> bool {
    path.split('.').any(|p| p == "lora")
}

/// Sets `require_grad` on every parameter by a predicate of its path.
pub struct TrainableMapper<F: Fn(&str) -> bool> {
    stack: Vec<String>,
    trainable: F,
}

impl<F: Fn(&str) -> bool> TrainableMapper<F> {
    /// A mapper that makes exactly the parameters whose path satisfies `trainable` train.
    pub fn new(trainable: F) -> Self {
        TrainableMapper {
            stack: Vec::new(),
            trainable,
        }
    }
}

impl<B: Backend, F: Fn(&str) -> bool> ModuleMapper<B> for TrainableMapper<F> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let train = (self.trainable)(&self.stack.join("."));
        param.set_require_grad(train)
    }
}
