//! Logits and loss of Hugging Face checkpoints equal transformers' (goldens made by
//! `tests/golden/gen.py`; see `tests/golden/README.md`).

use bellows_models::{causal_lm_loss_sum, load_pretrained, CausalLm, ForwardInput, KvCache};
use bellows_peft::LoraPlan;
use bellows_tests::{assert_close, golden, read_array, to_f64};
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};

type B = Flex;

fn run_case(case: &str, model_dir: &str) {
    let dir = golden(case);
    let dev = Default::default();
    let (arch, model) = load_pretrained::<B>(&golden(model_dir), &LoraPlan::none(), &dev)
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let inputs = dir.join("inputs.safetensors");
    let ids = read_array(&inputs, "input_ids");
    let labels = read_array(&inputs, "labels");
    let (b, s) = (ids.shape[0], ids.shape[1]);
    let logits = forward(&model, &ids.values, b, s);
    let exp = dir.join("expected.safetensors");
    let exp_logits = read_array(&exp, "logits");
    assert_eq!(exp_logits.shape, vec![b, s, arch.vocab_size]);
    let got = to_f64(logits.clone());
    assert_close(
        &format!("{case} logits"),
        &got,
        &exp_logits.values,
        1e-4,
        1e-4,
    );
    let labels: Vec<i64> = labels.values.iter().map(|&v| v as i64).collect();
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

fn forward(model: &CausalLm<B>, ids: &[f64], b: usize, s: usize) -> Tensor<B, 3> {
    let dev = Default::default();
    let ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), &dev);
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
    model.forward(
        t,
        &ForwardInput {
            positions: &positions,
            segments: None,
            compute: None,
        },
    )
}

#[test]
fn llama_with_gqa_and_random_norms_matches_transformers() {
    run_case("llama_gqa", "llama_gqa");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    run_case("llama3_rope", "llama3_rope");
}

#[test]
fn qwen2_qkv_bias_matches_transformers() {
    run_case("qwen2_bias", "qwen2_bias");
}

#[test]
fn tied_embeddings_match_transformers() {
    run_case("tied_embeddings", "tied_embeddings");
}

#[test]
fn transformers_4x_and_5x_configs_give_the_same_logits() {
    run_case("config_4x", "config_4x");
    run_case("config_5x", "config_5x");
}

#[test]
fn bf16_checkpoint_matches_transformers() {
    run_case("bf16_weights", "bf16_weights");
}

#[test]
fn mistral_matches_transformers() {
    run_case("mistral", "mistral");
}

#[test]
fn sharded_checkpoint_loads_through_its_index() {
    run_case("sharded", "sharded");
}

#[test]
fn explicit_head_dim_matches_transformers() {
    run_case("head_dim_explicit", "head_dim_explicit");
}

#[test]
fn greedy_generation_with_kv_cache_matches_transformers() {
    let dev = Default::default();
    let (_, model) =
        load_pretrained::<B>(&golden("llama_gqa"), &LoraPlan::none(), &dev).expect("load");
    let g = golden("generate").join("generate.safetensors");
    let prompt = read_array(&g, "prompt_ids");
    let expected = read_array(&g, "new_tokens");
    let (b, p) = (prompt.shape[0], prompt.shape[1]);
    let n = expected.shape[1];
    for row in 0..b {
        let mut cache = KvCache::new(2);
        let mut ids: Vec<i64> = prompt.values[row * p..(row + 1) * p]
            .iter()
            .map(|&v| v as i64)
            .collect();
        let mut next = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, p]), &dev);
        for _ in 0..n {
            let logits = model.forward_cached(next, &mut cache);
            let s = logits.dims()[1];
            let last = logits.slice([0..1, s - 1..s]).reshape([-1]);
            let tok = last.argmax(0).into_scalar() as i64;
            ids.push(tok);
            next = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![tok], [1, 1]), &dev);
        }
        let got: Vec<f64> = ids[p..].iter().map(|&v| v as f64).collect();
        assert_eq!(
            got,
            expected.values[row * n..(row + 1) * n].to_vec(),
            "row {row}"
        );
    }
}

/// Issue 3 (copy-free loading): base weights come straight from the files — loading draws nothing
/// from the init stream (no random init that is then overwritten); only adapters do.
#[test]
fn loading_draws_no_random_base_weights() {
    let dev = Default::default();
    let fresh = |seed| bellows_peft::InitRng::new(seed);
    let next = |rng: &mut bellows_peft::InitRng| -> Vec<f32> {
        rng.normal::<B, 1>([8], 0.0, 1.0, &dev)
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    };
    let mut rng = fresh(9);
    bellows_models::load_pretrained_with::<B>(
        &golden("llama_gqa"),
        &LoraPlan::none(),
        &mut rng,
        &dev,
    )
    .expect("load");
    assert_eq!(
        next(&mut rng),
        next(&mut fresh(9)),
        "the stream is untouched"
    );
    // With adapters, exactly the adapters' draws are taken: the same as attaching them by hand.
    let cfg = bellows_peft::PeftConfig {
        method: bellows_peft::Method::Lora,
        ..bellows_peft::PeftConfig::default()
    };
    let plan = cfg.plan().expect("plan");
    let mut rng = fresh(9);
    let (_, m) =
        bellows_models::load_pretrained_with::<B>(&golden("llama_gqa"), &plan, &mut rng, &dev)
            .expect("load");
    let a = m.model.layers[0]
        .self_attn
        .q_proj
        .lora
        .as_ref()
        .expect("adapter");
    let spec = plan
        .spec_for("model.layers.0.self_attn.q_proj", false)
        .expect("q_proj");
    let by_hand = bellows_peft::LoraAdapter::<B>::new(&spec, 64, 64, &mut fresh(9), &dev);
    assert_eq!(a.lora_a.val().into_data(), by_hand.lora_a.val().into_data());
}
