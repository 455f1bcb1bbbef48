"""Loads full models bellows saved (`save_pretrained`) with transformers' AutoModelForCausalLM and compares
transformers' logits with the logits bellows computed for the same weights (issue #3).

Folders (written by `BELLOWS_WRITE_GOLDEN=1 cargo test -p bellows-tests --test hf_export`):
  bellows_full/llama/          llama_gqa after 3 full fine-tune AdamW steps in bellows; logits in llama_logits.safetensors
  bellows_full/qwen2_sliding/  qwen2_sliding_window re-saved by bellows (biases, sliding-window config keys)

Writes tests/golden/bellows_full/hf_check.json, read by `tests/tests/hf_export.rs`:

    BELLOWS_WRITE_GOLDEN=1 cargo test -p bellows-tests --test hf_export
    tests/golden/.venv/bin/python tests/golden/check_bellows_model.py
"""
import json
import os

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {"llama": "llama_gqa", "qwen2_sliding": "qwen2_sliding_window"}


def main():
    torch.set_num_threads(1)
    case = os.path.join(HERE, "bellows_full")
    result = {"transformers_version": transformers.__version__, "torch_version": torch.__version__}
    for name, source in CASES.items():
        folder = os.path.join(case, name)
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                           output_loading_info=True)
        model.eval()
        ids = load_file(os.path.join(HERE, source, "inputs.safetensors"))["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        ours = load_file(os.path.join(case, f"{name}_logits.safetensors"))["logits"]
        src = AutoModelForCausalLM.from_pretrained(os.path.join(HERE, source), dtype=torch.float32,
                                                   attn_implementation="eager").eval()
        with torch.no_grad():
            src_logits = src(input_ids=ids).logits.float()
        r = {
            "architectures": model.config.architectures,
            "max_abs_logit_diff": float((logits - ours).abs().max()),
            f"max_abs_logit_change_vs_{source}": float((logits - src_logits).abs().max()),
            "missing_keys": len(info["missing_keys"]),
            "unexpected_keys": len(info["unexpected_keys"]),
            "mismatched_keys": len(info["mismatched_keys"]),
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        if name == "qwen2_sliding":
            r["layer_types"] = list(model.config.layer_types)
            r["sliding_window"] = model.config.sliding_window
        result[name] = r
        assert r["max_abs_logit_diff"] <= 1e-4 and r["missing_keys"] == 0, (name, r)
    with open(os.path.join(case, "hf_check.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
