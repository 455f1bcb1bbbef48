//! QLoRA models equal transformers + bitsandbytes (goldens `qlora_model` and `qlora_lora`, made by
//! `tests/golden/gen.py` / `nf4.py`; see `tests/golden/README.md` §3): bellows quantizing the f32
//! `llama_gqa` itself, and bellows reading the 4-bit checkpoint bitsandbytes saved, both give
//! transformers' logits, with and without a LoRA adapter.

use bellows_models::{
    causal_lm_loss_sum, load_pretrained, load_pretrained_quantized,
    load_pretrained_with_adapter_quantized, CausalLm, ForwardInput,
};
use bellows_peft::{InitRng, LoraPlan, Nf4Options};
use bellows_tests::{assert_close, golden, read_array, to_f64};
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

type B = Flex;

fn check_logits(what: &str, model: &CausalLm<B>, expected_case: &str, atol: f64) {
    let inputs = golden("llama_gqa").join("inputs.safetensors");
    let ids = read_array(&inputs, "input_ids");
    let labels: Vec<i64> = read_array(&inputs, "labels")
        .values
        .iter()
        .map(|&v| v as i64)
        .collect();
    let (b, s) = (ids.shape[0], ids.shape[1]);
    let dev = Default::default();
    let t = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.values.iter().map(|&v| v as i64).collect(), [b, s]),
        &dev,
    );
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
    let logits = model.forward(
        t,
        &ForwardInput {
            positions: &positions,
            segments: None,
            compute: None,
        },
    );
    let exp = golden(expected_case).join("expected.safetensors");
    let got = to_f64(logits.clone());
    assert_close(
        &format!("{what} logits"),
        &got,
        &read_array(&exp, "logits").values,
        atol,
        1e-4,
    );
    let l = causal_lm_loss_sum(logits, &labels);
    let loss = f64::from(l.sum.into_scalar()) / l.tokens as f64;
    assert_close(
        &format!("{what} loss"),
        &[loss],
        &read_array(&exp, "loss").values,
        atol / 10.0,
        1e-5,
    );
}

fn quantized_llama() -> CausalLm<B> {
    let dev = Default::default();
    let (_, model) = load_pretrained_quantized::<B>(
        &golden("llama_gqa"),
        &LoraPlan::none(),
        Some(Nf4Options::default()),
        &mut InitRng::new(0),
        &dev,
    )
    .expect("llama_gqa loads");
    model
}

fn flat(l: &bellows_peft::Linear<B>) -> Vec<f32> {
    l.dense_weight().into_data().to_vec::<f32>().expect("f32")
}

/// bellows' own quantization of `llama_gqa` equals, bit for bit, what transformers + bitsandbytes
/// saved (4-bit codes and 8-bit double-quantized scales: in `layers.1.self_attn.o_proj` block 35
/// bitsandbytes' CPU table rounds away from the nearest level, and bellows does the same), so
/// the logits equal transformers'.
#[test]
fn llama_quantized_by_bellows_matches_transformers_bitsandbytes() {
    let ours = quantized_llama();
    assert!(ours.is_quantized());
    assert!(ours.lm_head.as_ref().is_some_and(|h| !h.is_quantized()));
    assert_eq!(ours.linears().filter(|l| l.is_quantized()).count(), 14);
    let dev = Default::default();
    let (_, saved) = load_pretrained::<B>(&golden("qlora_model"), &LoraPlan::none(), &dev)
        .expect("the bnb 4-bit folder loads");
    for (i, (a, b)) in ours.linears().zip(saved.linears()).enumerate() {
        assert_eq!(flat(a), flat(b), "linear {i}: dequantized weight");
        if let (Some(qa), Some(qb)) = (&a.nf4, &b.nf4) {
            let bytes = |t: &Tensor<B, 1, Int>| t.clone().into_data().to_vec::<u8>().expect("u8");
            assert_eq!(
                bytes(&qa.packed),
                bytes(&qb.packed),
                "linear {i}: 4-bit codes"
            );
            let codes =
                |q: &bellows_peft::Nf4Weight<B>| bytes(q.absmax_codes.as_ref().expect("dq"));
            assert_eq!(codes(qa), codes(qb), "linear {i}: 8-bit scale codes");
            assert_eq!(
                qa.offset.to_bits(),
                qb.offset.to_bits(),
                "linear {i}: offset"
            );
        }
    }
    check_logits("bellows nf4", &ours, "qlora_model", 1e-4);
}

#[test]
fn bitsandbytes_saved_4bit_checkpoint_loads_with_transformers_logits_and_weights() {
    let dev = Default::default();
    let (_, saved) = load_pretrained::<B>(&golden("qlora_model"), &LoraPlan::none(), &dev)
        .expect("the bnb 4-bit folder loads");
    assert!(saved.is_quantized());
    check_logits("bnb checkpoint", &saved, "qlora_model", 1e-4);
    let deq = golden("qlora_model").join("dequant.safetensors");
    let layer0 = &saved.model.layers[0];
    for (name, l) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            &layer0.self_attn.q_proj,
        ),
        ("model.layers.0.mlp.down_proj.weight", &layer0.mlp.down_proj),
    ] {
        let exp: Vec<f32> = read_array(&deq, name)
            .values
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert_eq!(flat(l), exp, "{name}: dequantized weight");
    }
}

#[test]
fn lora_adapter_on_the_quantized_base_matches_bitsandbytes_peft() {
    let dev = Default::default();
    let adapter = golden("lora").join("adapter");
    // The 4-bit checkpoint, and bellows quantizing the f32 base as it loads.
    for (base, atol) in [("qlora_model", 1e-4), ("llama_gqa", 1e-4)] {
        let (_, _, model) = load_pretrained_with_adapter_quantized::<B>(
            &golden(base),
            &adapter,
            Some(Nf4Options::default()),
            &dev,
        )
        .unwrap_or_else(|e| panic!("{base}: {e}"));
        assert!(model.model.layers[0].self_attn.q_proj.lora.is_some());
        assert!(model.model.layers[0].self_attn.q_proj.is_quantized());
        check_logits(&format!("{base} + lora"), &model, "qlora_lora", atol);
    }
}

/// Loads a copy of `qlora_model` whose tensor `name` is dropped (`None`) or replaced by the
/// `uint8` bytes given, and returns the error message.
fn load_error_with(name: &str, bytes: Option<&[u8]>) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = golden("qlora_model");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy");
    let raw = std::fs::read(src.join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&raw).expect("valid");
    let mut tensors: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != name)
        .collect();
    if let Some(b) = bytes {
        let view = TensorView::new(Dtype::U8, vec![b.len()], b).expect("valid view");
        tensors.push((name.to_string(), view));
    }
    let out = safetensors::serialize(tensors, None).expect("serialize");
    std::fs::write(dir.path().join("model.safetensors"), out).expect("write");
    match load_pretrained::<B>(dir.path(), &LoraPlan::none(), &Default::default()) {
        Ok(_) => panic!("{name}: the broken checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_4bit_checkpoints_fail_naming_file_and_tensor() {
    let key = "model.layers.1.mlp.up_proj.weight.nested_absmax";
    let msg = load_error_with(key, None);
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight: ") && msg.contains("nested_absmax"),
        "{msg}"
    );
    let key = "model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4";
    let wrong_shape = br#"{"quant_type": "nf4", "blocksize": 64, "shape": [64, 32], "nested_blocksize": 256, "nested_offset": 0.2}"#;
    let msg = load_error_with(key, Some(wrong_shape));
    assert!(
        msg.contains(key) && msg.contains("shape [64, 32], expected [32, 64]"),
        "{msg}"
    );
    let msg = load_error_with(
        key,
        Some(br#"{"quant_type": "fp4", "blocksize": 64, "shape": [32, 64]}"#),
    );
    assert!(msg.contains(key) && msg.contains("fp4"), "{msg}");
    let key = "model.layers.0.self_attn.k_proj.weight";
    let msg = load_error_with(key, Some(&[0u8; 7]));
    assert!(msg.contains(key) && msg.contains("packed bytes"), "{msg}");
}

/// Quantize-on-load works for every checkpoint layout the f32 loader reads: q/k/v biases stay
/// dense next to their 4-bit weight, tied heads stay tied, shards and bf16 files quantize the same.
#[test]
fn every_checkpoint_layout_loads_quantized() {
    let dev = Default::default();
    for case in [
        "qwen2_bias",
        "tied_embeddings",
        "sharded",
        "bf16_weights",
        "mistral",
    ] {
        let (arch, model) = load_pretrained_quantized::<B>(
            &golden(case),
            &LoraPlan::none(),
            Some(Nf4Options::default()),
            &mut InitRng::new(0),
            &dev,
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let q = &model.model.layers[0].self_attn.q_proj;
        assert!(q.is_quantized(), "{case}");
        assert_eq!(
            q.bias.is_some(),
            arch.attention_bias,
            "{case}: bias kept dense"
        );
        assert_eq!(model.lm_head.is_none(), arch.tie_word_embeddings, "{case}");
        // The 4-bit model stays close to the f32 one (NF4 moves these logits by < 1.5).
        let inputs = golden(case).join("inputs.safetensors");
        let ids = read_array(&inputs, "input_ids");
        let (b, s) = (ids.shape[0], ids.shape[1]);
        let t = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.values.iter().map(|&v| v as i64).collect(), [b, s]),
            &dev,
        );
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
        let got = model
            .forward(
                t,
                &ForwardInput {
                    positions: &positions,
                    segments: None,
                    compute: None,
                },
            )
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        let exp = read_array(&golden(case).join("expected.safetensors"), "logits").values;
        let worst = got
            .iter()
            .zip(&exp)
            .map(|(g, e)| (f64::from(*g) - e).abs())
            .fold(0f64, f64::max);
        assert!(
            worst > 1e-3 && worst < 1.5,
            "{case}: max |nf4 - f32| logit = {worst}"
        );
    }
}
