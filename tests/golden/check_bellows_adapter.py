"""Loads the adapter bellows wrote (tests/golden/bellows_written/adapter) with Python PEFT and compares
PEFT's logits on the llama_gqa inputs with the logits bellows computed (bellows_logits.safetensors).

Writes tests/golden/bellows_written/peft_check.json, which the Rust test
`tests/tests/peft_export.rs` reads. Run after regenerating the adapter:

    BELLOWS_WRITE_GOLDEN=1 cargo test -p bellows-tests --test peft_export
    tests/golden/.venv/bin/python tests/golden/check_bellows_adapter.py
"""
import json
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    torch.set_num_threads(1)
    case = os.path.join(HERE, "bellows_written")
    base = AutoModelForCausalLM.from_pretrained(os.path.join(HERE, "llama_gqa"), dtype=torch.float32,
                                                attn_implementation="eager")
    ids = load_file(os.path.join(HERE, "llama_gqa", "inputs.safetensors"))["input_ids"]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
    model = PeftModel.from_pretrained(base, os.path.join(case, "adapter"))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    ours = load_file(os.path.join(case, "bellows_logits.safetensors"))["logits"]
    adapted = sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n})
    cfg = model.peft_config["default"]
    result = {
        "peft_version": __import__("peft").__version__,
        "torch_version": torch.__version__,
        "max_abs_logit_diff": float((logits - ours).abs().max()),
        "logit_change_vs_base": float((logits - base_logits).abs().max()),
        "adapted_modules": len(adapted),
        "use_dora": bool(cfg.use_dora),
        "use_rslora": bool(cfg.use_rslora),
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
    }
    with open(os.path.join(case, "peft_check.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    assert result["max_abs_logit_diff"] <= 1e-4, result


if __name__ == "__main__":
    main()
