//! PEFT adapters written by Python PEFT load into bellows with PEFT's logits, gradients, AdamW
//! trajectory and merged weights (goldens made by `tests/golden/gen.py`; see `tests/golden/README.md`).

use std::collections::HashMap;

use bellows_models::hf::{peft_key, state_dict};
use bellows_models::{
    causal_lm_loss_sum, is_adapter_path, load_pretrained, load_pretrained_with_adapter, CausalLm,
    ForwardInput, TrainableMapper,
};
use bellows_peft::LoraPlan;
use bellows_tests::{assert_close, golden, read_array, to_f64, Array};
use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

type B = Flex;
type AB = Autodiff<Flex>;

struct Inputs {
    ids: Vec<i64>,
    labels: Vec<i64>,
    b: usize,
    s: usize,
}

fn inputs(case: &str) -> Inputs {
    let path = golden(case).join("inputs.safetensors");
    let ids = read_array(&path, "input_ids");
    let labels = read_array(&path, "labels");
    Inputs {
        b: ids.shape[0],
        s: ids.shape[1],
        ids: ids.values.iter().map(|&v| v as i64).collect(),
        labels: labels.values.iter().map(|&v| v as i64).collect(),
    }
}

fn load<Bk: Backend>(case: &str) -> CausalLm<Bk> {
    let adapter = golden(case).join("adapter");
    let (_, _, model) =
        load_pretrained_with_adapter::<Bk>(&golden("llama_gqa"), &adapter, &Default::default())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
    model
}

fn logits<Bk: Backend>(model: &CausalLm<Bk>, inp: &Inputs) -> Tensor<Bk, 3> {
    let dev = Default::default();
    let t = Tensor::<Bk, 2, Int>::from_data(TensorData::new(inp.ids.clone(), [inp.b, inp.s]), &dev);
    let positions: Vec<u32> = (0..inp.b).flat_map(|_| 0..inp.s as u32).collect();
    model.forward(
        t,
        &ForwardInput {
            positions: &positions,
            segments: None,
            compute: None,
        },
    )
}

fn loss<Bk: Backend>(model: &CausalLm<Bk>, inp: &Inputs) -> Tensor<Bk, 1> {
    let l = causal_lm_loss_sum(logits(model, inp), &inp.labels);
    l.sum.div_scalar(l.tokens as f64)
}

fn check_logits(case: &str) {
    let model = load::<B>(case);
    let inp = inputs(case);
    let exp = golden(case).join("expected.safetensors");
    let got = to_f64(logits(&model, &inp));
    assert_close(
        &format!("{case} logits"),
        &got,
        &read_array(&exp, "logits").values,
        1e-4,
        1e-4,
    );
    let l = to_f64(loss(&model, &inp));
    assert_close(
        &format!("{case} loss"),
        &l,
        &read_array(&exp, "loss").values,
        1e-5,
        1e-5,
    );
}

#[test]
fn lora_adapter_from_peft_gives_peft_logits() {
    check_logits("lora");
}

#[test]
fn rslora_all_linear_adapter_from_peft_gives_peft_logits() {
    check_logits("rslora");
}

#[test]
fn dora_adapter_from_peft_gives_peft_logits() {
    check_logits("dora");
}

#[test]
fn default_init_adapter_leaves_the_base_logits_unchanged() {
    check_logits("lora_default_init");
    let inp = inputs("lora_default_init");
    let (_, base) =
        load_pretrained::<B>(&golden("llama_gqa"), &LoraPlan::none(), &Default::default())
            .expect("base");
    let adapted = to_f64(logits(&load::<B>("lora_default_init"), &inp));
    assert_eq!(
        adapted,
        to_f64(logits(&base, &inp)),
        "B = 0 must be an exact no-op"
    );
}

/// The model with only adapter tensors trainable, as the trainer builds it.
fn trainable(case: &str) -> CausalLm<AB> {
    load::<AB>(case).map(&mut TrainableMapper::new(is_adapter_path))
}

/// Every adapter tensor by PEFT key: its value, or its gradient when `grads` is given.
fn adapter_tensors(
    model: &CausalLm<AB>,
    grads: Option<&<AB as burn::tensor::backend::AutodiffBackend>::Gradients>,
) -> HashMap<String, Vec<f64>> {
    struct V<'a> {
        stack: Vec<String>,
        grads: Option<&'a <AB as burn::tensor::backend::AutodiffBackend>::Gradients>,
        out: HashMap<String, Vec<f64>>,
        frozen_with_grad: Vec<String>,
    }
    impl ModuleVisitor<AB> for V<'_> {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
            let path = self.stack.join(".");
            let grad = self.grads.and_then(|g| p.val().grad(g));
            if !is_adapter_path(&path) {
                if grad.is_some() {
                    self.frozen_with_grad.push(path);
                }
                return;
            }
            let v = match self.grads {
                Some(_) => to_f64(grad.unwrap_or_else(|| panic!("{path}: no gradient"))),
                None => to_f64(p.val()),
            };
            self.out.insert(peft_key(&path), v);
        }
    }
    let mut v = V {
        stack: Vec::new(),
        grads,
        out: HashMap::new(),
        frozen_with_grad: Vec::new(),
    };
    model.visit(&mut v);
    assert!(
        v.frozen_with_grad.is_empty(),
        "frozen base got gradients: {:?}",
        v.frozen_with_grad
    );
    v.out
}

fn compare_all(
    what: &str,
    got: &HashMap<String, Vec<f64>>,
    file: &std::path::Path,
    atol: f64,
    rtol: f64,
) {
    let names = safetensor_names(file);
    assert_eq!(
        got.len(),
        names.len(),
        "{what}: tensor count vs {}",
        file.display()
    );
    for name in names {
        let exp: Array = read_array(file, &name);
        let g = got
            .get(&name)
            .unwrap_or_else(|| panic!("{what}: bellows has no {name}"));
        assert_close(&format!("{what} {name}"), g, &exp.values, atol, rtol);
    }
}

fn safetensor_names(file: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(file).expect("golden file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.names().into_iter().map(String::from).collect()
}

fn check_grads(case: &str) {
    let model = trainable(case);
    let inp = inputs(case);
    let grads = loss(&model, &inp).backward();
    let got = adapter_tensors(&model, Some(&grads));
    compare_all(
        &format!("{case} grads"),
        &got,
        &golden(case).join("grads.safetensors"),
        1e-5,
        1e-3,
    );
}

#[test]
fn lora_gradients_match_pytorch() {
    check_grads("lora");
}

#[test]
fn rslora_gradients_match_pytorch() {
    check_grads("rslora");
}

#[test]
fn dora_gradients_with_detached_norm_match_pytorch() {
    check_grads("dora");
}

#[test]
fn default_init_gradients_match_pytorch() {
    check_grads("lora_default_init");
}

/// Five AdamW steps configured like `torch.optim.AdamW(lr=1e-2, eps=1e-8, weight_decay=0)`.
fn check_trajectory(case: &str) {
    let mut model = trainable(case);
    let inp = inputs(case);
    let mut optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<AB, CausalLm<AB>>();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let l = loss(&model, &inp);
        losses.extend(to_f64(l.clone()));
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    losses.extend(to_f64(loss(&model, &inp)));
    let traj = golden(case).join("trajectory.safetensors");
    assert_close(
        &format!("{case} losses"),
        &losses,
        &read_array(&traj, "losses").values,
        2e-4,
        1e-4,
    );
    let got = adapter_tensors(&model, None);
    compare_all(
        &format!("{case} trained adapter"),
        &got,
        &golden(case).join("trained_adapter.safetensors"),
        1e-4,
        1e-3,
    );
}

#[test]
fn lora_adamw_trajectory_follows_peft() {
    check_trajectory("lora");
}

#[test]
fn dora_adamw_trajectory_follows_peft() {
    check_trajectory("dora");
}

#[test]
fn rslora_adamw_trajectory_follows_peft() {
    check_trajectory("rslora");
}

fn weights(model: &CausalLm<B>) -> HashMap<String, Vec<f64>> {
    state_dict(model, false)
        .into_iter()
        .map(|(p, _, v)| (p, v.into_iter().map(f64::from).collect()))
        .collect()
}

fn check_merge(case: &str) {
    let merged = weights(&load::<B>(case).merge_adapters());
    let file = golden(case).join("merged.safetensors");
    for name in safetensor_names(&file) {
        let exp = read_array(&file, &name);
        let got = merged
            .get(&name)
            .unwrap_or_else(|| panic!("{case}: no {name}"));
        assert_close(
            &format!("{case} merged {name}"),
            got,
            &exp.values,
            1e-6,
            1e-5,
        );
    }
}

#[test]
fn lora_merge_equals_peft_merge_and_unload() {
    check_merge("lora");
    check_merge("rslora");
}

#[test]
fn dora_merge_equals_peft_merge_and_unload() {
    check_merge("dora");
}

#[test]
fn merge_in_place_keeps_logits_and_unmerge_restores_the_base() {
    let (_, base) =
        load_pretrained::<B>(&golden("llama_gqa"), &LoraPlan::none(), &Default::default())
            .expect("base");
    let base_w = weights(&base);
    for case in ["lora", "dora"] {
        let inp = inputs(case);
        let merged = load::<B>(case).merge_adapters_in_place();
        let exp = golden(case).join("expected.safetensors");
        let got = to_f64(logits(&merged, &inp));
        assert_close(
            &format!("{case} merged logits"),
            &got,
            &read_array(&exp, "logits").values,
            1e-4,
            1e-4,
        );
        let restored = weights(&merged.unmerge_adapters());
        for (name, w) in &base_w {
            assert_close(
                &format!("{case} unmerged {name}"),
                &restored[name],
                w,
                1e-6,
                1e-5,
            );
        }
    }
}
