#!/usr/bin/env python3
"""Generate the golden parity files under tests/golden/.

    python tests/golden/gen.py                 # every case, in place
    python tests/golden/gen.py --only lora     # one case (repeatable: --only a --only b)
    python tests/golden/gen.py --out /tmp/g    # write somewhere else (e.g. to diff against the committed files)
    python tests/golden/gen.py --list

Needs the pinned packages of tests/golden/requirements.txt (see README.md). CPU only. Deterministic:
every random number comes from a torch.Generator with a fixed seed, torch runs on one thread with
deterministic algorithms, so a rerun reproduces the committed files bit for bit.
"""
import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
try:
    import huggingface_hub.utils as _hfu

    _hfu.disable_progress_bars()
except Exception:  # pragma: no cover
    pass

OUT = HERE  # replaced by --out

# ---------------------------------------------------------------------------------------------
# shared settings
# ---------------------------------------------------------------------------------------------
BATCH = 2
SEQ = 16
ATTN = "eager"  # attention implementation used for every expected value (sdpa agrees to ~1.2e-6)

# The common tiny Llama. hidden 64, 4 heads (head_dim 16), 2 kv heads (GQA groups of 2),
# intermediate 96, vocab 96. ~74k parameters = ~296 KiB in f32.
BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# f32 tolerances for a Rust f32 implementation against these files (documented in README.md).
TOL_LOGITS = {"atol": 1e-4, "rtol": 1e-4}
TOL_LOSS = {"atol": 1e-5, "rtol": 1e-5}
TOL_HIDDEN = {"atol": 1e-4, "rtol": 1e-4}
TOL_GRAD = {"atol": 1e-5, "rtol": 1e-3}
TOL_TRAJ = {"atol": 2e-4, "rtol": 1e-4}
TOL_MERGED = {"atol": 1e-6, "rtol": 1e-5}


def versions():
    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    try:
        import peft

        v["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return v


def setup_torch():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


def case_dir(name):
    d = os.path.join(OUT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def save_st(path, tensors):
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path)


def rel(path):
    return os.path.relpath(path, OUT)


# ---------------------------------------------------------------------------------------------
# model building
# ---------------------------------------------------------------------------------------------
def randomize(model, seed, std=0.08, qk_std=0.15):
    """Overwrite every parameter from a seeded generator.

    Linear / embedding weights ~ N(0, std) (q_proj and k_proj N(0, qk_std) so attention is far from uniform
    and RoPE matters), biases ~ N(0, 0.1), RMSNorm weights 1 + 0.1*N(0,1) (never all ones, which would hide a
    missing multiply). Parameters are visited in named_parameters() order (tied ones once).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if "norm" in name:
                val = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif name.endswith(".bias"):
                val = 0.1 * torch.randn(shape, generator=g)
            elif "q_proj" in name or "k_proj" in name:
                val = qk_std * torch.randn(shape, generator=g)
            else:
                val = std * torch.randn(shape, generator=g)
            p.copy_(val.to(p.dtype))
    return model


def build(cls, cfg_cls, seed, **overrides):
    kw = dict(BASE)
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    model = cls._from_config(cfg, attn_implementation=ATTN, dtype=torch.float32)
    randomize(model, seed)
    model.eval()
    return model


def make_inputs(seed, vocab, batch=BATCH, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g, dtype=torch.int64)
    labels = ids.clone()
    # a masked "prompt" at the start of row 0, a hole and the last position in row 1
    labels[0, 0:4] = -100
    labels[1, 5] = -100
    labels[1, seq - 1] = -100
    return ids, labels


def forward(model, ids, labels, hidden=True):
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, output_hidden_states=hidden)
    res = {"logits": out.logits.float(), "loss": out.loss.float().reshape(1)}
    if hidden:
        for i, h in enumerate(out.hidden_states):
            res[f"hidden_states.{i}"] = h.float()
    return res


def load_folder(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN, dtype=torch.float32, **kw).eval()


def model_case_json(name, description, seed, cfg, extra=None, files=None):
    d = {
        "case": name,
        "kind": "model",
        "description": description,
        "versions": versions(),
        "seed": {"weights": seed, "inputs": seed + 1},
        "shapes": {
            "input_ids": [BATCH, SEQ],
            "labels": [BATCH, SEQ],
            "logits": [BATCH, SEQ, cfg.vocab_size],
            "loss": [1],
            "hidden_states.i": [BATCH, SEQ, cfg.hidden_size],
        },
        "num_hidden_states": cfg.num_hidden_layers + 1,
        "tolerance": {"logits": TOL_LOGITS, "loss": TOL_LOSS, "hidden_states": TOL_HIDDEN},
        "attn_implementation": ATTN,
        "files": files
        or {
            "model": ["config.json", "model.safetensors"],
            "inputs": "inputs.safetensors",
            "expected": "expected.safetensors",
        },
    }
    if extra:
        d.update(extra)
    return d


def finish_model_case(name, description, model, seed, d=None, extra=None, save=True, save_kw=None, files=None):
    """save_pretrained the model (unless save=False), reload it from the folder with transformers, run the
    forward on the fixed inputs from the *reloaded* model and write inputs/expected/case.json."""
    d = d or case_dir(name)
    if save:
        model.save_pretrained(d, **(save_kw or {}))
    ids, labels = make_inputs(seed + 1, model.config.vocab_size)
    reloaded = load_folder(d)
    exp = forward(reloaded, ids, labels)
    if save and model.dtype == torch.float32:
        # the in-memory model and the reloaded one must agree exactly
        ref = forward(model, ids, labels)
        assert torch.equal(ref["logits"], exp["logits"]), name
    save_st(os.path.join(d, "inputs.safetensors"), {"input_ids": ids, "labels": labels})
    save_st(os.path.join(d, "expected.safetensors"), exp)
    write_json(os.path.join(d, "case.json"), model_case_json(name, description, seed, reloaded.config, extra, files))
    return reloaded, ids, labels, exp


def max_diff(a, b):
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------
# 1. model cases
# ---------------------------------------------------------------------------------------------
def case_llama_gqa():
    seed = 100
    m = build(LlamaForCausalLM, LlamaConfig, seed)
    finish_model_case(
        "llama_gqa",
        "Tiny Llama, GQA: 4 query heads, 2 kv heads (each kv head serves 2 consecutive query heads), "
        "head_dim 16, rope_theta 1e4 default RoPE, untied lm_head, all weights incl. RMSNorm random. "
        "Also the base model of the PEFT cases and of the generate case.",
        m,
        seed,
    )


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def case_llama3_rope():
    seed = 110
    # head_dim 16 -> 8 frequencies, wavelengths 2*pi*1e4^(i/8) = 6.3, 20, 63, 199, 628, ... With
    # original_max_position_embeddings 16: high_freq_wavelen = 16/4 = 4, low_freq_wavelen = 16/1 = 16, so
    # frequency 0 (wavelen 6.3) is in the smooth band and frequencies 1..7 are divided by 8.
    m = build(
        LlamaForCausalLM,
        LlamaConfig,
        seed,
        rope_theta=10000.0,
        rope_scaling=dict(LLAMA3_ROPE),
        max_position_embeddings=128,
    )
    reloaded, ids, labels, exp = finish_model_case(
        "llama3_rope",
        "Tiny Llama with rope_scaling/rope_parameters rope_type llama3 (factor 8, low_freq_factor 1, "
        "high_freq_factor 4, original_max_position_embeddings 16, rope_theta 1e4): frequency 0 is in the "
        "smooth band, 1..7 are divided by 8. expected_unscaled.safetensors has the same weights run with "
        "default RoPE, to show the scaling matters.",
        m,
        seed,
    )
    # the same weights with plain RoPE: must differ clearly
    cfg = copy.deepcopy(reloaded.config)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = LlamaForCausalLM._from_config(cfg, attn_implementation=ATTN, dtype=torch.float32).eval()
    plain.load_state_dict(reloaded.state_dict())
    unscaled = forward(plain, ids, labels, hidden=False)
    diff = max_diff(unscaled["logits"], exp["logits"])
    assert diff > 1e-2, f"llama3 scaling changes logits by only {diff}"
    d = os.path.join(OUT, "llama3_rope")
    save_st(os.path.join(d, "expected_unscaled.safetensors"), unscaled)
    # the inverse frequencies themselves, as transformers computes them
    inv = reloaded.model.rotary_emb.inv_freq.float()
    save_st(os.path.join(d, "rope.safetensors"), {"inv_freq": inv, "inv_freq_unscaled": plain.model.rotary_emb.inv_freq.float()})
    cj = json.load(open(os.path.join(d, "case.json")))
    cj["checks"] = {"max_abs_logit_diff_vs_unscaled": diff}
    cj["files"]["expected_unscaled"] = "expected_unscaled.safetensors"
    cj["files"]["rope"] = "rope.safetensors (inv_freq [head_dim/2] after llama3 scaling, inv_freq_unscaled)"
    cj["tolerance"]["inv_freq"] = {"atol": 0.0, "rtol": 1e-6}
    write_json(os.path.join(d, "case.json"), cj)


def case_qwen2_bias():
    seed = 120
    m = build(
        Qwen2ForCausalLM,
        Qwen2Config,
        seed,
        rope_theta=1000000.0,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=2,
    )
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    finish_model_case(
        "qwen2_bias",
        "Tiny Qwen2: q_proj/k_proj/v_proj have biases (random N(0,0.1)), o_proj none; rope_theta 1e6; "
        "no sliding window; untied.",
        m,
        seed,
    )


def case_tied_embeddings():
    seed = 130
    m = build(LlamaForCausalLM, LlamaConfig, seed, tie_word_embeddings=True)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    name = "tied_embeddings"
    finish_model_case(
        name,
        "Tiny Llama with tie_word_embeddings true: model.safetensors has no lm_head.weight; logits use "
        "model.embed_tokens.weight.",
        m,
        seed,
    )
    keys = load_file(os.path.join(OUT, name, "model.safetensors")).keys()
    assert "lm_head.weight" not in keys, sorted(keys)


def config_4x_from_5x(cfg5):
    """Rewrite a transformers-5.x config.json dict in the 4.x style."""
    c = {}
    for k, v in cfg5.items():
        if k == "rope_parameters":
            rp = dict(v)
            c["rope_theta"] = rp.pop("rope_theta")
            if rp.get("rope_type", "default") == "default" and len(rp) == 1:
                c["rope_scaling"] = None
            else:
                c["rope_scaling"] = rp
        elif k == "dtype":
            c["torch_dtype"] = v
        elif k == "transformers_version":
            c[k] = "4.46.3"
        elif k == "head_dim" and v * cfg5["num_attention_heads"] == cfg5["hidden_size"]:
            continue  # 4.x-era checkpoints (e.g. Llama 3.1) omit head_dim: readers must fall back to hidden/heads
        else:
            c[k] = v
    return c


def case_config_styles():
    seed = 140
    rope = {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 2.0,
        "original_max_position_embeddings": 32,
    }
    m = build(LlamaForCausalLM, LlamaConfig, seed, rope_theta=500000.0, rope_scaling=rope, max_position_embeddings=128)
    desc = (
        "Same tiny Llama (rope_theta 5e5, llama3 rope scaling factor 4, low 1, high 2, original max 32) in "
        "two config.json styles: {} Both folders hold the identical model.safetensors and expected values; "
        "transformers {} loads both to bit-identical logits."
    )
    d5 = case_dir("config_5x")
    m.save_pretrained(d5)
    cfg5 = json.load(open(os.path.join(d5, "config.json")))
    assert "rope_parameters" in cfg5 and "dtype" in cfg5, "installed transformers does not write the 5.x style"
    d4 = case_dir("config_4x")
    shutil.copy(os.path.join(d5, "model.safetensors"), os.path.join(d4, "model.safetensors"))
    shutil.copy(os.path.join(d5, "generation_config.json"), os.path.join(d4, "generation_config.json"))
    cfg4 = config_4x_from_5x(cfg5)
    write_json(os.path.join(d4, "config.json"), cfg4)
    # both must load to the same logits, and the rope parameters must matter
    ids, labels = make_inputs(seed + 1, m.config.vocab_size)
    e5 = forward(load_folder(d5), ids, labels)
    e4 = forward(load_folder(d4), ids, labels)
    assert torch.equal(e4["logits"], e5["logits"]), max_diff(e4["logits"], e5["logits"])
    cfg_plain = copy.deepcopy(m.config)
    cfg_plain.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = LlamaForCausalLM._from_config(cfg_plain, attn_implementation=ATTN, dtype=torch.float32).eval()
    plain.load_state_dict(m.state_dict())
    diff = max_diff(forward(plain, ids, labels, hidden=False)["logits"], e5["logits"])
    assert diff > 1e-2, diff
    for name, d, style in (
        ("config_5x", d5, "this one 5.x (`rope_parameters` {rope_theta, rope_type, ...}, `dtype`)."),
        ("config_4x", d4, "this one 4.x (`rope_theta`, `rope_scaling` {rope_type, ...}, `torch_dtype`, no `head_dim`; hand-written)."),
    ):
        save_st(os.path.join(d, "inputs.safetensors"), {"input_ids": ids, "labels": labels})
        save_st(os.path.join(d, "expected.safetensors"), e5)
        extra = {
            "config_style": name[-2:],
            "checks": {
                "logits_4x_equal_5x_in_transformers": True,
                "max_abs_logit_diff_vs_default_rope_theta_1e4": diff,
            },
        }
        write_json(
            os.path.join(d, "case.json"),
            model_case_json(name, desc.format(style, transformers.__version__), seed, m.config, extra),
        )


def case_bf16_weights():
    seed = 150
    m = build(LlamaForCausalLM, LlamaConfig, seed)
    m = m.to(torch.bfloat16)
    name = "bf16_weights"
    d = case_dir(name)
    m.save_pretrained(d)
    st = load_file(os.path.join(d, "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in st.values())
    finish_model_case(
        name,
        "Tiny Llama whose model.safetensors is all bf16 (config dtype bfloat16). Expected values: "
        "transformers loads with dtype=float32 (every bf16 weight upcast exactly to f32) and computes in f32. "
        "A reader must upcast bf16 -> f32 (exact) and then match at f32 tolerance.",
        m,
        seed,
        d=d,
        save=False,
        extra={"weights_dtype": "bfloat16", "compute_dtype": "float32"},
    )


def case_mistral():
    seed = 160
    m = build(MistralForCausalLM, MistralConfig, seed, sliding_window=4096, rope_theta=10000.0)
    reloaded, ids, labels, exp = finish_model_case(
        "mistral",
        "Tiny model_type mistral (MistralForCausalLM): same math as Llama at this length. sliding_window "
        "4096 (as Mistral-7B-v0.1) is longer than the sequence, so it has no effect here; GQA 4/2; untied. "
        "expected_sliding_window_4.safetensors: the same weights run with config sliding_window = 4 "
        "(query i attends to keys j with i - 4 < j <= i, transformers' sliding_window_overlay).",
        m,
        seed,
    )
    cfg = copy.deepcopy(reloaded.config)
    cfg.sliding_window = 4
    sw = MistralForCausalLM._from_config(cfg, attn_implementation=ATTN, dtype=torch.float32).eval()
    sw.load_state_dict(reloaded.state_dict())
    sw_out = forward(sw, ids, labels, hidden=False)
    diff = max_diff(sw_out["logits"], exp["logits"])
    # the first 4 positions see the same keys either way
    same_head = max_diff(sw_out["logits"][:, :4], exp["logits"][:, :4])
    assert diff > 1e-2 and same_head < 1e-5, (diff, same_head)
    d = os.path.join(OUT, "mistral")
    save_st(os.path.join(d, "expected_sliding_window_4.safetensors"), sw_out)
    cj = json.load(open(os.path.join(d, "case.json")))
    cj["files"]["expected_sliding_window_4"] = "expected_sliding_window_4.safetensors (logits, loss)"
    cj["checks"] = {"max_abs_logit_diff_sliding_window_4_vs_4096": diff,
                    "max_abs_logit_diff_first_4_positions": same_head}
    write_json(os.path.join(d, "case.json"), cj)


def greedy_no_cache(model, prompt, n):
    """Plain argmax loop without a KV cache: (sequences, raw next-token logits [n, B, V])."""
    cur = prompt.clone()
    logits = []
    with torch.no_grad():
        for _ in range(n):
            lg = model(input_ids=cur).logits[:, -1].float()
            logits.append(lg)
            cur = torch.cat([cur, lg.argmax(-1, keepdim=True)], 1)
    return cur, torch.stack(logits, 0)


def sliding_generate(model, d, seed, new_tokens=10):
    """Greedy KV-cached generate past the window; asserts it equals the no-cache loop; writes generate.safetensors."""
    gc = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                          pad_token_id=0, bos_token_id=1)
    for attempt in range(100):
        g = torch.Generator().manual_seed(seed + attempt)
        prompt = torch.randint(3, model.config.vocab_size, (BATCH, 6), generator=g, dtype=torch.int64)
        cur, ref = greedy_no_cache(model, prompt, new_tokens)
        top2 = ref.topk(2, dim=-1).values
        margin = float((top2[..., 0] - top2[..., 1]).min())
        if int(cur[:, 6:].min()) >= 3 and margin > 1e-3:
            break
    else:
        raise AssertionError("no usable prompt")
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gc,
                             return_dict_in_generate=True, output_logits=True)
    step_logits = torch.stack([l.float() for l in out.logits], 0)
    assert torch.equal(cur, out.sequences), (cur, out.sequences)
    cache_vs_nocache = max_diff(step_logits, ref)
    assert cache_vs_nocache < 1e-5, cache_vs_nocache
    save_st(os.path.join(d, "generate.safetensors"),
            {"prompt_ids": prompt, "sequences": out.sequences, "new_tokens": out.sequences[:, 6:],
             "step_logits": step_logits})
    return {"min_top1_top2_margin": margin, "prompt_seed_used": seed + attempt,
            "max_abs_step_logit_diff_kv_cache_vs_no_cache": cache_vs_nocache}


def case_mistral_sliding_window():
    seed = 250
    name = "mistral_sliding_window"
    m = build(MistralForCausalLM, MistralConfig, seed, sliding_window=4, rope_theta=10000.0)
    reloaded, ids, labels, exp = finish_model_case(
        name,
        "Tiny Mistral with config.json sliding_window = 4 and sequences of 16: query i attends to keys j with "
        "i - 4 < j <= i in every layer (transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window, "
        "and causal). generate.safetensors: greedy KV-cached generate of 10 new tokens from a [2, 6] prompt "
        "(16 positions, well past the window), equal to a no-cache argmax loop (asserted).",
        m,
        seed,
    )
    full = copy.deepcopy(reloaded.config)
    full.sliding_window = None
    plain = MistralForCausalLM._from_config(full, attn_implementation=ATTN, dtype=torch.float32).eval()
    plain.load_state_dict(reloaded.state_dict())
    diff = max_diff(forward(plain, ids, labels, hidden=False)["logits"], exp["logits"])
    assert diff > 1e-2, diff
    d = os.path.join(OUT, name)
    checks = sliding_generate(reloaded, d, seed + 2)
    checks["max_abs_logit_diff_vs_no_window"] = diff
    cj = json.load(open(os.path.join(d, "case.json")))
    cj["checks"] = checks
    cj["files"]["generate"] = "generate.safetensors (prompt_ids, sequences, new_tokens, step_logits [10, 2, 96])"
    cj["tolerance"]["new_tokens"] = "exact"
    cj["tolerance"]["step_logits"] = TOL_LOGITS
    write_json(os.path.join(d, "case.json"), cj)


def case_qwen2_sliding_window():
    seed = 260
    name = "qwen2_sliding_window"
    m = build(Qwen2ForCausalLM, Qwen2Config, seed, rope_theta=10000.0, use_sliding_window=True,
              sliding_window=4, max_window_layers=1)
    assert m.config.layer_types == ["full_attention", "sliding_attention"], m.config.layer_types
    reloaded, ids, labels, exp = finish_model_case(
        name,
        "Tiny Qwen2 with use_sliding_window = true, sliding_window = 4, max_window_layers = 1: transformers "
        "makes layer i a sliding-window layer iff i >= max_window_layers (config layer_types = [full_attention, "
        "sliding_attention]); layer 0 attends causally to everything, layer 1 only to i - 4 < j <= i.",
        m,
        seed,
    )
    checks = {}
    for label, types in [("all_full", ["full_attention"] * 2), ("all_sliding", ["sliding_attention"] * 2)]:
        cfg = copy.deepcopy(reloaded.config)
        cfg.layer_types = types
        other = Qwen2ForCausalLM._from_config(cfg, attn_implementation=ATTN, dtype=torch.float32).eval()
        other.load_state_dict(reloaded.state_dict())
        checks[f"max_abs_logit_diff_vs_{label}"] = max_diff(forward(other, ids, labels, hidden=False)["logits"],
                                                            exp["logits"])
        assert checks[f"max_abs_logit_diff_vs_{label}"] > 1e-2, checks
    d = os.path.join(OUT, name)
    cj = json.load(open(os.path.join(d, "case.json")))
    cj["checks"] = checks
    write_json(os.path.join(d, "case.json"), cj)


def case_sharded():
    seed = 170
    m = build(LlamaForCausalLM, LlamaConfig, seed)
    name = "sharded"
    d = case_dir(name)
    m.save_pretrained(d, max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) >= 3 and os.path.exists(os.path.join(d, "model.safetensors.index.json")), shards
    finish_model_case(
        name,
        "Tiny Llama saved with save_pretrained(max_shard_size='100KB'): model.safetensors.index.json "
        f"(metadata.total_size + weight_map tensor name -> shard file) and {len(shards)} shards.",
        m,
        seed,
        d=d,
        save=False,
        files={
            "model": ["config.json", "model.safetensors.index.json"] + shards,
            "inputs": "inputs.safetensors",
            "expected": "expected.safetensors",
        },
    )


def case_head_dim_explicit():
    seed = 180
    m = build(LlamaForCausalLM, LlamaConfig, seed, head_dim=24, intermediate_size=64)
    assert m.model.layers[0].self_attn.q_proj.weight.shape == (96, 64)
    finish_model_case(
        "head_dim_explicit",
        "Tiny Llama with head_dim 24 != hidden_size/num_attention_heads (64/4 = 16): q_proj [96, 64], "
        "k_proj/v_proj [48, 64], o_proj [64, 96]; attention scale 1/sqrt(24); RoPE over 24 dims (12 freqs). "
        "intermediate_size 64.",
        m,
        seed,
    )


def case_generate():
    """Greedy generation with the llama_gqa model (read from ../llama_gqa, not duplicated)."""
    seed = 190
    name = "generate"
    src = os.path.join(OUT, "llama_gqa")
    assert os.path.exists(os.path.join(src, "model.safetensors")), "run the llama_gqa case first"
    model = load_folder(src)
    d = case_dir(name)
    gc = GenerationConfig(
        max_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0, bos_token_id=1,
    )
    # draw prompts until greedy decoding emits no special token (0 pad, 1 bos, 2 eos: transformers would
    # stop or suppress there) and the top-1/top-2 margin is never tiny; deterministic search over seeds
    for attempt in range(100):
        g = torch.Generator().manual_seed(seed + attempt)
        prompt = torch.randint(3, model.config.vocab_size, (BATCH, 6), generator=g, dtype=torch.int64)
        cur = prompt.clone()
        ref_logits = []
        with torch.no_grad():
            for _ in range(8):  # plain no-cache argmax loop
                lg = model(input_ids=cur).logits[:, -1].float()
                ref_logits.append(lg)
                cur = torch.cat([cur, lg.argmax(-1, keepdim=True)], 1)
        ref_logits = torch.stack(ref_logits, 0)
        top2 = ref_logits.topk(2, dim=-1).values
        margin = float((top2[..., 0] - top2[..., 1]).min())
        if int(cur[:, 6:].min()) >= 3 and margin > 1e-3:
            break
    else:
        raise AssertionError("no usable prompt")
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            generation_config=gc,
            return_dict_in_generate=True,
            output_logits=True,
        )
    seqs = out.sequences
    step_logits = torch.stack([l.float() for l in out.logits], 0)  # [8, B, V]
    assert torch.equal(cur, seqs), (cur, seqs)
    cache_vs_nocache = max_diff(step_logits, ref_logits)
    assert cache_vs_nocache < 1e-5, cache_vs_nocache
    save_st(
        os.path.join(d, "generate.safetensors"),
        {"prompt_ids": prompt, "sequences": seqs, "new_tokens": seqs[:, prompt.shape[1]:], "step_logits": step_logits},
    )
    write_json(
        os.path.join(d, "case.json"),
        {
            "case": name,
            "kind": "generate",
            "description": "Greedy decoding (do_sample false, 1 beam, no repetition penalty, no logits processors) of "
            "8 new tokens from a [2, 6] prompt with the ../llama_gqa model. sequences = prompt ++ new tokens. "
            "step_logits[t] are the raw next-token logits for new token t (from the KV-cached generate; a "
            "no-cache argmax loop gives the same tokens). The prompt seed was searched so that no special token "
            "(0 pad, 1 bos, 2 eos) is generated, so eos handling never matters.",
            "versions": versions(),
            "seed": {"prompt": seed + attempt, "weights": "see ../llama_gqa"},
            "model_dir": "../llama_gqa",
            "shapes": {"prompt_ids": [BATCH, 6], "sequences": [BATCH, 14], "new_tokens": [BATCH, 8],
                       "step_logits": [8, BATCH, model.config.vocab_size]},
            "tolerance": {"new_tokens": "exact", "step_logits": TOL_LOGITS},
            "checks": {"min_top1_top2_margin": margin, "prompt_seed_used": seed + attempt,
                       "max_abs_step_logit_diff_kv_cache_vs_no_cache": cache_vs_nocache},
            "files": {"generate": "generate.safetensors"},
        },
    )


# ---------------------------------------------------------------------------------------------
# 2. PEFT cases (base = llama_gqa)
# ---------------------------------------------------------------------------------------------
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
ADAMW_STEPS = 5


def peft_case(name, seed, lora_kwargs, description, randomize_adapter=True):
    from peft import LoraConfig, get_peft_model

    src = os.path.join(OUT, "llama_gqa")
    assert os.path.exists(os.path.join(src, "model.safetensors")), "run the llama_gqa case first"
    base = load_folder(src)
    ids, labels = make_inputs(100 + 1, base.config.vocab_size)  # the llama_gqa inputs
    base_out = forward(base, ids, labels, hidden=False)

    base.name_or_path = "../../llama_gqa"  # written as base_model_name_or_path (relative to the adapter folder)
    torch.manual_seed(seed)  # PEFT's own init (kaiming-uniform A) draws from the global generator
    cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **lora_kwargs)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    if randomize_adapter:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_A" in n or "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            # DoRA magnitude: PEFT inits it to the row norms of W (+ s*B*A with B = 0); perturb it
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    model.eval()

    d = case_dir(name)
    ad = os.path.join(d, "adapter")
    model.save_pretrained(ad)
    os.remove(os.path.join(ad, "README.md"))  # PEFT's boilerplate model card
    saved = load_file(os.path.join(ad, "adapter_model.safetensors"))

    def saved_key(n):
        # PEFT's saved names drop the adapter name; the DoRA magnitude parameter
        # (lora_magnitude_vector.default.weight) is saved as plain `lora_magnitude_vector`
        k = n.replace(".default", "")
        if k.endswith(".lora_magnitude_vector.weight"):
            k = k[: -len(".weight")]
        return k

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(saved_key(n) for n, _ in trainable) == sorted(saved.keys()), (
        sorted(saved_key(n) for n, _ in trainable)[:4], sorted(saved.keys())[:4])
    for n, p in trainable:
        assert torch.equal(saved[saved_key(n)], p.detach()), n

    # forward + backward at the initial adapter
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    expected = {"logits": out.logits.detach().float(), "loss": out.loss.detach().float().reshape(1)}
    grads = {saved_key(n): p.grad.detach().clone() for n, p in trainable}
    min_abs_grad = float(min(gr.abs().min() for gr in grads.values()))
    logit_diff_vs_base = max_diff(expected["logits"], base_out["logits"])

    # merged weights of the initial adapter
    merged_model = copy.deepcopy(model).merge_and_unload()
    targets = sorted({saved_key(n).rsplit(".lora_", 1)[0].replace("base_model.model.", "", 1) for n in saved})
    msd = merged_model.state_dict()
    merged = {f"{t}.weight": msd[f"{t}.weight"].float() for t in targets}
    with torch.no_grad():
        merged_logits = merged_model(input_ids=ids).logits.float()
    merged_vs_adapter = max_diff(merged_logits, expected["logits"])

    # AdamW trajectory on the fixed batch
    model.zero_grad()
    model.train()
    opt = torch.optim.AdamW([p for _, p in trainable], foreach=False, **ADAMW)
    losses = []
    for _ in range(ADAMW_STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(model(input_ids=ids, labels=labels).loss))
    trained = {saved_key(n): p.detach().clone() for n, p in trainable}

    save_st(os.path.join(d, "inputs.safetensors"), {"input_ids": ids, "labels": labels})
    save_st(os.path.join(d, "expected.safetensors"), expected)
    save_st(os.path.join(d, "grads.safetensors"), grads)
    save_st(os.path.join(d, "merged.safetensors"), merged)
    save_st(os.path.join(d, "trajectory.safetensors"),
            {"losses": torch.tensor(losses, dtype=torch.float32)})
    save_st(os.path.join(d, "trained_adapter.safetensors"), trained)
    acfg = json.load(open(os.path.join(ad, "adapter_config.json")))
    r, alpha = acfg["r"], acfg["lora_alpha"]
    scaling = alpha / (r ** 0.5) if acfg.get("use_rslora") else alpha / r
    write_json(
        os.path.join(d, "case.json"),
        {
            "case": name,
            "kind": "peft",
            "description": description,
            "versions": versions(),
            "seed": {"adapter": seed, "base_weights": 100, "inputs": 101},
            "base_model_dir": "../llama_gqa",
            "adapter_dir": "adapter",
            "lora": {"r": r, "lora_alpha": alpha, "use_rslora": bool(acfg.get("use_rslora")),
                     "use_dora": bool(acfg.get("use_dora")), "scaling": scaling,
                     "target_modules": targets, "lora_dropout": 0.0},
            "optimizer": {"name": "torch.optim.AdamW", "lr": ADAMW["lr"], "betas": list(ADAMW["betas"]),
                          "eps": ADAMW["eps"], "weight_decay": ADAMW["weight_decay"], "amsgrad": False,
                          "maximize": False, "foreach": False, "steps": ADAMW_STEPS,
                          "params": "only the adapter tensors (base frozen)", "grad_clipping": None,
                          "lr_schedule": "constant"},
            "shapes": {"logits": list(expected["logits"].shape), "loss": [1], "losses": [ADAMW_STEPS + 1]},
            "tolerance": {"logits": TOL_LOGITS, "loss": TOL_LOSS, "grads": TOL_GRAD, "merged": TOL_MERGED,
                          "losses": TOL_TRAJ, "trained_adapter": {"atol": 1e-4, "rtol": 1e-3}},
            "checks": {"max_abs_logit_diff_vs_base": logit_diff_vs_base,
                       "max_abs_logit_diff_merged_vs_adapter": merged_vs_adapter,
                       "min_abs_grad_element": min_abs_grad,
                       "losses": losses},
            "files": {
                "adapter": ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"],
                "inputs": "inputs.safetensors (same as ../llama_gqa)",
                "expected": "expected.safetensors: logits [2,16,96], loss [1] with the adapter applied",
                "grads": "grads.safetensors: d loss / d tensor for every adapter tensor after one backward "
                         "of `loss` at the initial adapter, keyed like adapter_model.safetensors",
                "merged": "merged.safetensors: merge_and_unload() weights of the adapted linears "
                          "(HF names, [out, in]) for the initial adapter",
                "trajectory": f"trajectory.safetensors: losses[{ADAMW_STEPS + 1}] = loss before AdamW step "
                              f"1..{ADAMW_STEPS}, then the loss after step {ADAMW_STEPS}",
                "trained_adapter": f"trained_adapter.safetensors: adapter tensors after {ADAMW_STEPS} AdamW "
                                   "steps (PEFT key names)",
            },
        },
    )
    return logit_diff_vs_base


def case_lora():
    diff = peft_case(
        "lora", 200, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "LoRA r=4, alpha=8 (scaling 2) on q_proj and v_proj of ../llama_gqa. lora_A and lora_B both "
        "N(0, 0.1) (B non-zero). y = W x + scaling * B (A x).",
    )
    assert diff > 1e-2, diff


def case_rslora():
    diff = peft_case(
        "rslora", 210, dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
        "rsLoRA r=4, alpha=8 (scaling alpha/sqrt(r) = 4) on all linears except lm_head (PEFT 'all-linear': "
        "q,k,v,o,gate,up,down) of ../llama_gqa. A, B ~ N(0, 0.1).",
    )
    assert diff > 1e-2, diff


def case_dora():
    diff = peft_case(
        "dora", 220, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
        "DoRA r=4, alpha=8 (scaling 2) on q_proj and v_proj of ../llama_gqa. A, B ~ N(0, 0.1); magnitude "
        "(lora_magnitude_vector, [out]) = PEFT's init (row norms of W) * (1 + 0.1 N(0,1)). PEFT's forward: "
        "y = (m/n - 1) * W x + (m/n) * scaling * B A x + W x, n = ||W + scaling B A|| per output row, "
        "n DETACHED (no gradient flows through the norm, DoRA paper sec. 4.3). Merged weight = "
        "(m/n) (W + scaling B A).",
    )
    assert diff > 1e-2, diff


def case_lora_default_init():
    diff = peft_case(
        "lora_default_init", 230, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "A fresh PEFT default-init LoRA (r=4, alpha=8, q_proj/v_proj): A kaiming-uniform(a=sqrt(5)), B = 0, "
        "so the logits equal ../llama_gqa's exactly; grads of lora_A are exactly 0 and of lora_B non-zero.",
        randomize_adapter=False,
    )
    assert diff == 0.0, diff


def case_weighted_adapters():
    """Two named adapters on ../llama_gqa, switched with set_adapter, and PEFT's linear
    add_weighted_adapter of them (two weightings, one negative)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    name = "weighted_adapters"
    src = os.path.join(OUT, "llama_gqa")
    first_dir = os.path.join(OUT, "lora", "adapter")
    assert os.path.exists(os.path.join(first_dir, "adapter_model.safetensors")), "run the lora case first"
    d = case_dir(name)
    ids, labels = make_inputs(100 + 1, BASE["vocab_size"])  # the llama_gqa inputs

    # the second adapter: same rank as ../lora (linear combination needs equal ranks), other alpha, and one
    # more target (up_proj), so the combined adapter's up_proj comes from the second adapter alone
    base = load_folder(src)
    base.name_or_path = "../../llama_gqa"
    seed = 240
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "v_proj", "up_proj"])
    second = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in second.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    second_dir = os.path.join(d, "adapter_second")
    second.save_pretrained(second_dir)
    os.remove(os.path.join(second_dir, "README.md"))

    # both adapters loaded by name into one model; "first" is active after from_pretrained
    base = load_folder(src)
    base.name_or_path = "../../llama_gqa"
    model = PeftModel.from_pretrained(base, first_dir, adapter_name="first")
    model.load_adapter(second_dir, adapter_name="second")
    model.eval()
    out = {}

    def logits_of(adapter):
        model.set_adapter(adapter)
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    out["logits_first"] = logits_of("first")
    out["logits_second"] = logits_of("second")
    combos = {"linear": [0.7, 0.3], "negative": [1.0, -0.5]}
    checks = {}
    for combo, weights in combos.items():
        model.add_weighted_adapter(["first", "second"], weights, combo, combination_type="linear")
        out[f"logits_{combo}"] = logits_of(combo)
        cd = os.path.join(d, f"combined_{combo}")
        model.save_pretrained(d, selected_adapters=[combo])  # writes <d>/<combo>/
        os.rename(os.path.join(d, combo), cd)
        os.remove(os.path.join(d, "README.md"))  # PEFT's boilerplate model card, written next to the folder
        # PEFT's linear rule, checked by hand on q_proj of layer 0 (both adapters have it)
        t = model.base_model.model.model.layers[0].self_attn.q_proj
        wa = [math.sqrt(abs(w * t.scaling[a])) * (1 if w * t.scaling[a] >= 0 else -1)
              for a, w in zip(["first", "second"], weights)]
        wb = [math.sqrt(abs(w * t.scaling[a])) for a, w in zip(["first", "second"], weights)]
        a_exp = sum(w * t.lora_A[a].weight for a, w in zip(["first", "second"], wa))
        b_exp = sum(w * t.lora_B[a].weight for a, w in zip(["first", "second"], wb))
        assert torch.allclose(t.lora_A[combo].weight, a_exp) and torch.allclose(t.lora_B[combo].weight, b_exp)
        assert t.scaling[combo] == 1.0, t.scaling[combo]  # the new adapter has r = lora_alpha = 4
        checks[f"{combo}_max_abs_logit_diff_vs_first"] = max_diff(out[f"logits_{combo}"], out["logits_first"])
    ref = load_file(os.path.join(OUT, "lora", "expected.safetensors"))["logits"]
    checks["first_vs_lora_case_logits"] = max_diff(out["logits_first"], ref)
    assert checks["first_vs_lora_case_logits"] == 0.0, checks
    save_st(os.path.join(d, "inputs.safetensors"), {"input_ids": ids, "labels": labels})
    save_st(os.path.join(d, "expected.safetensors"), out)
    write_json(
        os.path.join(d, "case.json"),
        {
            "case": name,
            "kind": "peft_multi",
            "description": "PeftModel.from_pretrained(base, ../lora/adapter, adapter_name='first'), "
                           "load_adapter(adapter_second, 'second') (r 4, alpha 16, q/v/up_proj, A, B ~ N(0, 0.1)), "
                           "then add_weighted_adapter(['first', 'second'], w, name, combination_type='linear') for "
                           "w = [0.7, 0.3] ('linear') and [1.0, -0.5] ('negative'). PEFT's linear rule per module: "
                           "A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i over the "
                           "adapters that have the module (s_i = that adapter's scaling), new r = lora_alpha = r "
                           "(scaling 1), target_modules = the union; other config keys from the first adapter.",
            "versions": versions(),
            "seed": {"second_adapter": seed, "base_weights": 100, "inputs": 101},
            "base_model_dir": "../llama_gqa",
            "adapters": {"first": "../lora/adapter", "second": "adapter_second"},
            "combinations": {k: {"weights": v, "adapter": f"combined_{k}"} for k, v in combos.items()},
            "tolerance": {"logits": TOL_LOGITS, "combined_tensors": {"atol": 1e-6, "rtol": 1e-5}},
            "checks": checks,
            "files": {
                "expected": "expected.safetensors: logits_first, logits_second, logits_linear, logits_negative "
                            "[2,16,96], each with that adapter active",
                "combined": "combined_<name>/: the combined adapter as PEFT saves it",
            },
        },
    )


def case_full_finetune():
    """Full-model gradients and an AdamW (with weight decay) trajectory on ../llama_gqa."""
    name = "full_finetune"
    src = os.path.join(OUT, "llama_gqa")
    assert os.path.exists(os.path.join(src, "model.safetensors")), "run the llama_gqa case first"
    model = load_folder(src)
    ids, labels = make_inputs(100 + 1, model.config.vocab_size)
    d = case_dir(name)
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    min_abs_nonzero = float(min(g[g != 0].abs().min() for g in grads.values()))
    zeros = int(sum((g == 0).sum() for g in grads.values()))
    below_1e6 = int(sum(((g != 0) & (g.abs() < 1e-6)).sum() for g in grads.values()))
    opt_kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), foreach=False, **opt_kw)
    losses = []
    for _ in range(ADAMW_STEPS):
        opt.zero_grad()
        l = model(input_ids=ids, labels=labels).loss
        losses.append(float(l.detach()))
        l.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(model(input_ids=ids, labels=labels).loss))
    save_st(os.path.join(d, "grads.safetensors"), grads)
    save_st(os.path.join(d, "trajectory.safetensors"), {"losses": torch.tensor(losses, dtype=torch.float32)})
    write_json(
        os.path.join(d, "case.json"),
        {
            "case": name,
            "kind": "full_finetune",
            "description": "Full fine-tuning of ../llama_gqa on its inputs: grads.safetensors = d loss / d p for "
            "every parameter after one backward (HF names; includes RMSNorm weights, embed_tokens, lm_head); "
            "trajectory.safetensors losses[6] = loss before each of 5 torch.optim.AdamW steps on the same batch, "
            "then after the 5th. AdamW with weight_decay 0.1 (decoupled: p -= lr*wd*p before the Adam update, "
            "applied to every parameter incl. norms and embeddings) so its semantics matter.",
            "versions": versions(),
            "seed": {"base_weights": 100, "inputs": 101},
            "base_model_dir": "../llama_gqa",
            "inputs": "../llama_gqa/inputs.safetensors",
            "optimizer": {"name": "torch.optim.AdamW", "lr": opt_kw["lr"], "betas": list(opt_kw["betas"]),
                          "eps": opt_kw["eps"], "weight_decay": opt_kw["weight_decay"], "amsgrad": False,
                          "foreach": False, "steps": ADAMW_STEPS, "params": "all", "grad_clipping": None,
                          "lr_schedule": "constant"},
            "tolerance": {"grads": TOL_GRAD, "losses": TOL_TRAJ},
            "checks": {"loss": float(loss.detach()), "losses": losses,
                       "exactly_zero_grad_elements": zeros,
                       "exactly_zero_grad_note": "embed_tokens rows of token ids absent from input_ids",
                       "min_abs_nonzero_grad_element": min_abs_nonzero,
                       "nonzero_grad_elements_below_1e-6": below_1e6},
            "files": {"grads": "grads.safetensors", "trajectory": "trajectory.safetensors"},
        },
    )


# ---------------------------------------------------------------------------------------------
# 3. bitsandbytes NF4
# ---------------------------------------------------------------------------------------------
def case_nf4_quant():
    import nf4

    nf4.case_nf4_quant(OUT, case_dir("nf4_quant"), versions(), save_st, write_json)


def case_qlora_model():
    import nf4

    nf4.case_qlora_model(OUT, case_dir("qlora_model"), versions(), save_st, write_json, make_inputs, forward,
                         load_folder)


def case_qlora_lora():
    import nf4

    nf4.case_qlora_lora(OUT, case_dir("qlora_lora"), versions(), save_st, write_json, forward, load_folder)


CASES = [
    ("llama_gqa", case_llama_gqa),
    ("llama3_rope", case_llama3_rope),
    ("qwen2_bias", case_qwen2_bias),
    ("tied_embeddings", case_tied_embeddings),
    ("config_styles", case_config_styles),  # writes config_4x and config_5x
    ("bf16_weights", case_bf16_weights),
    ("mistral", case_mistral),
    ("mistral_sliding_window", case_mistral_sliding_window),
    ("qwen2_sliding_window", case_qwen2_sliding_window),
    ("sharded", case_sharded),
    ("head_dim_explicit", case_head_dim_explicit),
    ("generate", case_generate),
    ("lora", case_lora),
    ("rslora", case_rslora),
    ("dora", case_dora),
    ("lora_default_init", case_lora_default_init),
    ("weighted_adapters", case_weighted_adapters),
    ("full_finetune", case_full_finetune),
    ("nf4_quant", case_nf4_quant),
    ("qlora_model", case_qlora_model),
    ("qlora_lora", case_qlora_lora),
]
ALIASES = {"config_4x": "config_styles", "config_5x": "config_styles"}


def write_manifest():
    """manifest.json: every case folder present under OUT with its kind and the sha256 of each file."""
    import hashlib

    cases = {}
    for name in sorted(os.listdir(OUT)):
        cj = os.path.join(OUT, name, "case.json")
        if not os.path.isfile(cj):
            continue
        files = {}
        for root, _, fs in os.walk(os.path.join(OUT, name)):
            for f in sorted(fs):
                full = os.path.join(root, f)
                with open(full, "rb") as fh:
                    files[os.path.relpath(full, os.path.join(OUT, name))] = hashlib.sha256(fh.read()).hexdigest()
        cases[name] = {"kind": json.load(open(cj)).get("kind"), "files": dict(sorted(files.items()))}
    write_json(os.path.join(OUT, "manifest.json"), {"generator": "tests/golden/gen.py", "cases": cases})


def main():
    global OUT
    if os.environ.get("PYTHONHASHSEED") != "0":
        # PEFT writes target_modules from a Python set: fix the string hash so the order is reproducible
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="case name (repeatable)")
    ap.add_argument("--out", help="output root (default: this folder)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        for n, _ in CASES:
            print(n)
        return
    if a.out:
        OUT = os.path.abspath(a.out)
        os.makedirs(OUT, exist_ok=True)
        # cases that read ../llama_gqa need it in the output root
        if a.only and "llama_gqa" not in a.only and not os.path.exists(os.path.join(OUT, "llama_gqa")):
            a.only = ["llama_gqa"] + a.only
    wanted = None if not a.only else {ALIASES.get(o, o) for o in a.only}
    known = {n for n, _ in CASES}
    if wanted and wanted - known:
        sys.exit(f"unknown case(s): {sorted(wanted - known)}; see --list")
    setup_torch()
    for n, fn in CASES:
        if wanted is None or n in wanted:
            print(f"[gen] {n}", flush=True)
            setup_torch()
            fn()
    write_manifest()
    print("[gen] done", flush=True)


if __name__ == "__main__":
    main()
