//! Several named adapters on one model, one active, and PEFT's linear `add_weighted_adapter`
//! (issue #4), against the `weighted_adapters` golden made with PEFT by `tests/golden/gen.py`.

use std::collections::BTreeSet;

use bellows_models::{load_pretrained, CausalLm, ForwardInput, ParamLister, PeftModel};
use bellows_peft::{read_adapter_config, Combination, TargetModules};
use bellows_tests::{assert_close, golden, read_array, to_f64};
use burn::backend::Flex;
use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};

type B = Flex;

fn inputs() -> (Vec<i64>, usize, usize) {
    let ids = read_array(
        &golden("weighted_adapters").join("inputs.safetensors"),
        "input_ids",
    );
    let v = ids.values.iter().map(|&x| x as i64).collect();
    (v, ids.shape[0], ids.shape[1])
}

fn logits(model: &CausalLm<B>) -> Vec<f64> {
    let (ids, b, s) = inputs();
    let dev = Default::default();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), &dev);
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
    let out = model.forward(
        t,
        &ForwardInput {
            positions: &positions,
            segments: None,
            compute: None,
        },
    );
    to_f64(out)
}

fn expected(name: &str) -> Vec<f64> {
    let path = golden("weighted_adapters").join("expected.safetensors");
    read_array(&path, &format!("logits_{name}")).values
}

fn two_adapters() -> PeftModel<B> {
    let (_, base) = load_pretrained::<B>(
        &golden("llama_gqa"),
        &bellows_peft::LoraPlan::none(),
        &Default::default(),
    )
    .expect("base");
    let mut m = PeftModel::new(base);
    m.load_adapter(&golden("lora").join("adapter"), "first")
        .expect("first");
    m.load_adapter(
        &golden("weighted_adapters").join("adapter_second"),
        "second",
    )
    .expect("second");
    m
}

fn param_count(model: &CausalLm<B>) -> usize {
    let mut l = ParamLister::default();
    model.visit(&mut l);
    l.params
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum()
}

#[test]
fn switching_named_adapters_gives_each_adapters_peft_logits() {
    let mut m = two_adapters();
    assert_eq!(m.active_adapter(), Some("first"));
    assert_eq!(m.adapter_names(), ["first", "second"]);
    assert_close("first", &logits(m.model()), &expected("first"), 1e-4, 1e-4);
    m.set_adapter("second").expect("known");
    assert_close(
        "second",
        &logits(m.model()),
        &expected("second"),
        1e-4,
        1e-4,
    );
    m.set_adapter("first").expect("known");
    assert_close(
        "first again",
        &logits(m.model()),
        &expected("first"),
        1e-4,
        1e-4,
    );
    assert!(m.set_adapter("third").is_err());
}

fn adapter_numel(dir: &std::path::Path) -> usize {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).expect("adapter file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("adapter file");
    st.tensors()
        .iter()
        .map(|(_, v)| v.shape().iter().product::<usize>())
        .sum()
}

#[test]
fn only_the_active_adapter_is_in_the_model() {
    let (_, base) = load_pretrained::<B>(
        &golden("llama_gqa"),
        &bellows_peft::LoraPlan::none(),
        &Default::default(),
    )
    .expect("base");
    let base = param_count(&base);
    let mut m = two_adapters();
    let first = adapter_numel(&golden("lora").join("adapter"));
    let second = adapter_numel(&golden("weighted_adapters").join("adapter_second"));
    assert!(first > 0 && second > first);
    assert_eq!(param_count(m.model()), base + first);
    m.set_adapter("second").expect("known");
    assert_eq!(param_count(m.model()), base + second);
}

fn check_combination(name: &str, weights: [f64; 2]) {
    let mut m = two_adapters();
    m.add_weighted_adapter(&["first", "second"], &weights, name, Combination::Linear)
        .expect("combines");
    assert_eq!(
        m.active_adapter(),
        Some("first"),
        "combining keeps the active adapter"
    );
    m.set_adapter(name).expect("known");
    assert_close(name, &logits(m.model()), &expected(name), 1e-4, 1e-4);

    // The combined tensors and config equal the adapter PEFT saved.
    let dir = tempfile::tempdir().expect("tmp");
    m.save_adapter(name, "../../llama_gqa", dir.path())
        .expect("saved");
    let peft_dir = golden("weighted_adapters").join(format!("combined_{name}"));
    let (ours, theirs) = (
        read_adapter_config(dir.path()).expect("ours"),
        read_adapter_config(&peft_dir).expect("theirs"),
    );
    assert_eq!((ours.r, ours.alpha), (theirs.r, theirs.alpha));
    let names = |t: &TargetModules| match t {
        TargetModules::Names(v) => v.iter().cloned().collect::<BTreeSet<_>>(),
        other => panic!("expected names, got {other:?}"),
    };
    assert_eq!(names(&ours.target_modules), names(&theirs.target_modules));
    let file = |d: &std::path::Path| d.join("adapter_model.safetensors");
    let bytes = std::fs::read(file(&peft_dir)).expect("peft file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("peft file");
    let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
    keys.sort();
    assert_eq!(keys.len(), 12, "q, v, up of 2 layers, A and B");
    for key in keys {
        let got = read_array(&file(dir.path()), &key);
        let exp = read_array(&file(&peft_dir), &key);
        assert_eq!(got.shape, exp.shape, "{key}");
        assert_close(&key, &got.values, &exp.values, 1e-6, 1e-5);
    }
}

#[test]
fn linear_combination_equals_peft_add_weighted_adapter() {
    check_combination("linear", [0.7, 0.3]);
}

#[test]
fn linear_combination_with_a_negative_weight_equals_peft() {
    check_combination("negative", [1.0, -0.5]);
}

#[test]
fn deleting_the_active_adapter_activates_the_next_one() {
    let mut m = two_adapters();
    m.delete_adapter("first").expect("known");
    assert_eq!(m.active_adapter(), Some("second"));
    assert_close(
        "second",
        &logits(m.model()),
        &expected("second"),
        1e-4,
        1e-4,
    );
    m.delete_adapter("second").expect("known");
    assert_eq!(m.active_adapter(), None);
    assert!(m.adapter_names().is_empty());
    assert!(m.delete_adapter("second").is_err());
}

#[test]
fn dora_adapters_and_name_clashes_are_refused() {
    let mut m = two_adapters();
    m.load_adapter(&golden("dora").join("adapter"), "dora")
        .expect("dora loads as a named adapter");
    m.set_adapter("dora").expect("known");
    let exp = read_array(&golden("dora").join("expected.safetensors"), "logits").values;
    assert_close("dora", &logits(m.model()), &exp, 1e-4, 1e-4);
    let e = m
        .add_weighted_adapter(&["first", "dora"], &[0.5, 0.5], "mix", Combination::Linear)
        .expect_err("DoRA");
    assert!(e.to_string().contains("DoRA"), "{e}");
    assert_eq!(
        m.active_adapter(),
        Some("dora"),
        "a failed combination keeps the active adapter"
    );
    let e = m
        .load_adapter(&golden("lora").join("adapter"), "first")
        .expect_err("taken");
    assert!(e.to_string().contains("exists"), "{e}");
    let e = m
        .add_weighted_adapter(&["first"], &[0.5, 0.5], "mix", Combination::Linear)
        .expect_err("lengths");
    assert!(e.to_string().contains("2 weights"), "{e}");
}
