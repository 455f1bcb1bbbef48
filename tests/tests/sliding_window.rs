//! Sliding-window attention (issue #3): Mistral's `sliding_window` and Qwen2's
//! `use_sliding_window` / `max_window_layers` / `layer_types`, in the forward pass and in KV-cached
//! generation, against transformers goldens (`tests/golden/gen.py`: `mistral_sliding_window`,
//! `qwen2_sliding_window`, and `mistral/expected_sliding_window_4.safetensors`).

use bellows_models::hf::{parse_config, to_config_json};
use bellows_models::{
    causal_lm_loss_sum, load_pretrained, read_arch, CausalLm, ForwardInput, KvCache, SlidingWindow,
};
use bellows_peft::LoraPlan;
use bellows_tests::{assert_close, golden, read_array, to_f64};
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};

type B = Flex;

fn ids(case: &str) -> (Vec<i64>, Vec<i64>, usize, usize) {
    let inputs = golden(case).join("inputs.safetensors");
    let ids = read_array(&inputs, "input_ids");
    let labels = read_array(&inputs, "labels");
    let as_i64 = |v: &[f64]| v.iter().map(|&x| x as i64).collect();
    (
        as_i64(&ids.values),
        as_i64(&labels.values),
        ids.shape[0],
        ids.shape[1],
    )
}

fn forward(
    model: &CausalLm<B>,
    ids: &[i64],
    b: usize,
    s: usize,
    seg: Option<&[u32]>,
) -> Tensor<B, 3> {
    let dev = Default::default();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [b, s]), &dev);
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
    model.forward(
        t,
        &ForwardInput {
            positions: &positions,
            segments: seg,
            compute: None,
        },
    )
}

/// Logits and loss of `model` on `case`'s inputs against `expected` in `case`.
fn check(model: &CausalLm<B>, case: &str, expected: &str) {
    let (ids, labels, b, s) = ids(case);
    let logits = forward(model, &ids, b, s, None);
    let exp = golden(case).join(expected);
    let got = to_f64(logits.clone());
    assert_close(
        &format!("{case} logits"),
        &got,
        &read_array(&exp, "logits").values,
        1e-4,
        1e-4,
    );
    let l = causal_lm_loss_sum(logits, &labels);
    let loss = f64::from(l.sum.into_scalar()) / l.tokens as f64;
    assert_close(
        &format!("{case} loss"),
        &[loss],
        &read_array(&exp, "loss").values,
        1e-5,
        1e-5,
    );
}

fn load(case: &str) -> CausalLm<B> {
    load_pretrained::<B>(&golden(case), &LoraPlan::none(), &Default::default())
        .unwrap_or_else(|e| panic!("{case}: {e}"))
        .1
}

#[test]
fn mistral_sliding_window_from_config_matches_transformers() {
    let arch = read_arch(&golden("mistral_sliding_window")).expect("config");
    assert_eq!(
        arch.sliding_window,
        Some(SlidingWindow {
            size: 4,
            layers: vec![true, true]
        })
    );
    check(
        &load("mistral_sliding_window"),
        "mistral_sliding_window",
        "expected.safetensors",
    );
}

#[test]
fn qwen2_windows_only_the_layers_from_max_window_layers_on() {
    let arch = read_arch(&golden("qwen2_sliding_window")).expect("config");
    assert_eq!((arch.window_of(0), arch.window_of(1)), (None, Some(4)));
    check(
        &load("qwen2_sliding_window"),
        "qwen2_sliding_window",
        "expected.safetensors",
    );
    // Without `layer_types`, transformers derives the same from `max_window_layers`.
    let text = std::fs::read_to_string(golden("qwen2_sliding_window").join("config.json"))
        .expect("config");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v.as_object_mut().expect("object").remove("layer_types");
    let derived = parse_config("config.json".as_ref(), &v.to_string()).expect("parses");
    assert_eq!(derived.sliding_window, arch.sliding_window);
    // `use_sliding_window: false` (and `sliding_window: null`, as transformers 5 writes) means none.
    assert_eq!(
        read_arch(&golden("qwen2_bias"))
            .expect("config")
            .sliding_window,
        None
    );
    v["use_sliding_window"] = serde_json::json!(false);
    let off = parse_config("config.json".as_ref(), &v.to_string()).expect("parses");
    assert_eq!(off.sliding_window, None);
}

#[test]
fn a_window_longer_than_the_sequence_changes_nothing_and_4_matches_transformers() {
    let mut model = load("mistral");
    check(&model, "mistral", "expected.safetensors"); // sliding_window 4096 > 16 positions
    for layer in &mut model.model.layers {
        layer.self_attn.sliding_window = Some(4);
    }
    check(&model, "mistral", "expected_sliding_window_4.safetensors");
}

#[test]
fn sliding_window_config_round_trips_through_save() {
    for case in [
        "mistral_sliding_window",
        "qwen2_sliding_window",
        "qwen2_bias",
        "mistral",
    ] {
        let arch = read_arch(&golden(case)).expect("config");
        let text = to_config_json(&arch, "float32").to_string();
        let back = parse_config("config.json".as_ref(), &text).expect("parses");
        assert_eq!(back.sliding_window, arch.sliding_window, "{case}");
    }
}

#[test]
fn one_packed_document_equals_no_segments_under_a_window() {
    let model = load("mistral_sliding_window");
    let (ids, _, b, s) = ids("mistral_sliding_window");
    let seg = vec![0u32; b * s];
    let plain = to_f64(forward(&model, &ids, b, s, None));
    let packed = to_f64(forward(&model, &ids, b, s, Some(&seg)));
    assert_close("packed", &packed, &plain, 0.0, 0.0);
}

#[test]
fn kv_cached_generation_past_the_window_matches_transformers() {
    let dev = Default::default();
    let model = load("mistral_sliding_window");
    let g = golden("mistral_sliding_window").join("generate.safetensors");
    let prompt = read_array(&g, "prompt_ids");
    let expected = read_array(&g, "new_tokens");
    let step_logits = read_array(&g, "step_logits");
    let (b, p) = (prompt.shape[0], prompt.shape[1]);
    let (n, v) = (expected.shape[1], step_logits.shape[2]);
    for row in 0..b {
        let mut cache = KvCache::new(model.model.layers.len());
        let mut ids: Vec<i64> = prompt.values[row * p..(row + 1) * p]
            .iter()
            .map(|&x| x as i64)
            .collect();
        let mut next = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, p]), &dev);
        for step in 0..n {
            let logits = model.forward_cached(next, &mut cache);
            let s = logits.dims()[1];
            let last = logits.slice([0..1, s - 1..s]).reshape([v]);
            let got = to_f64(last.clone());
            let at = (step * b + row) * v;
            assert_close(
                &format!("row {row} step {step}"),
                &got,
                &step_logits.values[at..at + v],
                1e-4,
                1e-4,
            );
            let tok = last.argmax(0).into_scalar() as i64;
            ids.push(tok);
            next = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![tok], [1, 1]), &dev);
        }
        let got: Vec<f64> = ids[p..].iter().map(|&x| x as f64).collect();
        assert_eq!(
            got,
            expected.values[row * n..(row + 1) * n].to_vec(),
            "row {row}"
        );
    }
}
