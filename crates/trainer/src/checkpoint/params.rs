//! Parameters and AdamW state by parameter path (`model.layers.0.self_attn.q_proj.weight`), so a
//! checkpoint does not depend on burn's per-process `ParamId`s.
//!
//! Optimizer keys follow PyTorch's AdamW state names: `<path>.exp_avg` (first moment),
//! `<path>.exp_avg_sq` (second moment) and `<path>.step` (the step count used by bias correction,
//! an i64 tensor of shape `[1]`).

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamWState, AdaptiveMomentumState, Optimizer};
use burn::tensor::{backend::AutodiffBackend, Tensor, TensorData};

/// The AdamW optimizer of the recipe for model `M` (burn's arithmetic and state, fused on the
/// CPU backend: [`crate::adamw::FusedAdamW`]).
pub type AdamWOptim<M, B> = OptimizerAdaptor<crate::adamw::FusedAdamW, M, B>;

/// The optimizer's per-`ParamId` state map.
type Records<M, B> = <AdamWOptim<M, B> as Optimizer<M, B>>::Record;

/// Which parameters a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selection {
    /// Every float parameter (full fine-tuning).
    All,
    /// Only trainable parameters (adapters and `modules_to_save`).
    Trainable,
}

impl Selection {
    fn wants(self, trainable: bool) -> bool {
        self == Selection::All || trainable
    }
}

/// Path stack shared by the visitors below.
#[derive(Default)]
struct Stack(Vec<String>);

impl Stack {
    fn path(&self) -> String {
        self.0.join(".")
    }
}

/// The selected parameters as `(path, data)`, in module order, dtype kept.
pub(crate) fn collect_params<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    sel: Selection,
) -> Vec<(String, TensorData)> {
    struct V {
        stack: Stack,
        sel: Selection,
        out: Vec<(String, TensorData)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.0.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if self.sel.wants(p.is_require_grad()) {
                self.out.push((self.stack.path(), p.val().into_data()));
            }
        }
    }
    let mut v = V {
        stack: Stack::default(),
        sel,
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Replaces the selected parameters of `model` with `tensors[path]`, keeping ids and trainability.
/// Returns the model and every problem found (missing key, shape mismatch), each naming the path.
pub(crate) fn apply_params<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: M,
    sel: Selection,
    tensors: &mut HashMap<String, TensorData>,
) -> (M, Vec<String>) {
    struct Map<'a> {
        stack: Stack,
        sel: Selection,
        tensors: &'a mut HashMap<String, TensorData>,
        problems: Vec<String>,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Map<'_> {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.0.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.0.pop();
        }
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let trainable = p.is_require_grad();
            if !self.sel.wants(trainable) {
                return p;
            }
            let path = self.stack.path();
            let Some(data) = self.tensors.remove(&path) else {
                self.problems.push(format!("{path}: missing"));
                return p;
            };
            let want = p.lazy_shape().dims::<D>().to_vec();
            if data.shape.to_vec() != want {
                self.problems.push(format!(
                    "{path}: shape {:?} in the checkpoint, {want:?} in the model",
                    data.shape.to_vec()
                ));
                return p;
            }
            let device = p.val().device();
            let dtype = data.dtype;
            let t = Tensor::<B, D>::from_data(data, (&device, dtype));
            let t = if trainable { t.require_grad() } else { t };
            Param::initialized(p.id, t).set_require_grad(trainable)
        }
    }
    let mut m = Map {
        stack: Stack::default(),
        sel,
        tensors,
        problems: Vec::new(),
    };
    let model = model.map(&mut m);
    (model, m.problems)
}

/// The optimizer state of every parameter that has one, keyed by path (see the module docs).
pub(crate) fn collect_optim<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    optim: &AdamWOptim<M, B>,
) -> Vec<(String, TensorData)> {
    struct V<'a, B: AutodiffBackend, M: AutodiffModule<B>> {
        stack: Stack,
        rec: &'a Records<M, B>,
        out: Vec<(String, TensorData)>,
    }
    impl<B: AutodiffBackend, M: AutodiffModule<B>> ModuleVisitor<B> for V<'_, B, M> {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.0.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let Some(r) = self.rec.get(&p.id) else { return };
            let state: AdamWState<B::InnerBackend, D> = r.clone().into_state::<D>();
            let m = state.momentum;
            let path = self.stack.path();
            self.out
                .push((format!("{path}.exp_avg"), m.moment_1.into_data()));
            self.out
                .push((format!("{path}.exp_avg_sq"), m.moment_2.into_data()));
            self.out.push((
                format!("{path}.step"),
                TensorData::new(vec![m.time as i64], [1]),
            ));
        }
    }
    let rec = optim.to_record();
    let mut v = V::<'_, B, M> {
        stack: Stack::default(),
        rec: &rec,
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Loads optimizer state saved by [`collect_optim`] into `optim`, under `model`'s current ids.
/// Returns the optimizer and every problem found, each naming the key.
pub(crate) fn apply_optim<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    optim: AdamWOptim<M, B>,
    tensors: &mut HashMap<String, TensorData>,
) -> (AdamWOptim<M, B>, Vec<String>) {
    struct V<'a, B: AutodiffBackend, M: AutodiffModule<B>> {
        stack: Stack,
        tensors: &'a mut HashMap<String, TensorData>,
        rec: Records<M, B>,
        problems: Vec<String>,
    }
    impl<B: AutodiffBackend, M: AutodiffModule<B>> ModuleVisitor<B> for V<'_, B, M> {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.0.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let path = self.stack.path();
            let keys = ["exp_avg", "exp_avg_sq", "step"].map(|k| format!("{path}.{k}"));
            let [m1, m2, step] = keys.clone().map(|k| self.tensors.remove(&k));
            let (m1, m2, step) = match (m1, m2, step) {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                (None, None, None) => return,
                _ => {
                    self.problems
                        .push(format!("{path}: incomplete optimizer state"));
                    return;
                }
            };
            let want = p.lazy_shape().dims::<D>().to_vec();
            for (k, d) in [(&keys[0], &m1), (&keys[1], &m2)] {
                if d.shape.to_vec() != want {
                    self.problems.push(format!(
                        "{k}: shape {:?} in the checkpoint, {want:?} in the model",
                        d.shape.to_vec()
                    ));
                    return;
                }
            }
            let time = match step.to_vec::<i64>().ok().and_then(|v| v.first().copied()) {
                Some(t) if t >= 0 => t as usize,
                _ => {
                    self.problems
                        .push(format!("{}: not a non-negative i64 step count", keys[2]));
                    return;
                }
            };
            let device = p.val().device();
            let t = |d: TensorData| {
                let dtype = d.dtype;
                Tensor::<B::InnerBackend, D>::from_data(d, (&device, dtype))
            };
            let state = AdamWState::new(AdaptiveMomentumState::new(time, t(m1), t(m2)));
            self.rec.insert(p.id, AdaptorRecord::from_state::<D>(state));
        }
    }
    let mut rec = optim.to_record();
    rec.clear();
    let mut v = V::<'_, B, M> {
        stack: Stack::default(),
        tensors,
        rec,
        problems: Vec::new(),
    };
    model.visit(&mut v);
    let problems = v.problems;
    (optim.load_record(v.rec), problems)
}

/// Every float parameter's path, by id.
pub(crate) fn param_paths<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
) -> HashMap<ParamId, String> {
    struct V {
        stack: Stack,
        out: HashMap<ParamId, String>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.0.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.out.insert(p.id, self.stack.path());
        }
    }
    let mut v = V {
        stack: Stack::default(),
        out: HashMap::new(),
    };
    model.visit(&mut v);
    v.out
}
