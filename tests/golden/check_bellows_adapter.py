"""Loads adapters bellows wrote with Python PEFT and records PEFT's verdict in a peft_check.json.

1. tests/golden/bellows_written/adapter (trained by bellows): PEFT's logits on the llama_gqa inputs vs the
   logits bellows computed (bellows_logits.safetensors). Read by `tests/tests/peft_export.rs`.
2. tests/golden/bellows_combined/adapter (`bellows combine-adapters` of ../lora/adapter and
   ../weighted_adapters/adapter_second with weights 0.7,0.3): PEFT's logits with it vs PEFT's own
   `add_weighted_adapter` result (weighted_adapters/expected.safetensors `logits_linear`, which bellows'
   in-memory combination also matches, `tests/tests/multi_adapter.rs`). Read by `launch/tests/combine.rs`.

Run after regenerating the adapters:

    BELLOWS_WRITE_GOLDEN=1 cargo test -p bellows-tests --test peft_export
    BELLOWS_WRITE_GOLDEN=1 cargo test -p bellows-launch --test combine
    tests/golden/.venv/bin/python tests/golden/check_bellows_adapter.py
"""
import json
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


def check(case_name, reference):
    """PEFT loads <case_name>/adapter on llama_gqa; its logits are compared with `reference()`."""
    case = os.path.join(HERE, case_name)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(HERE, "llama_gqa"), dtype=torch.float32,
                                                attn_implementation="eager")
    ids = load_file(os.path.join(HERE, "llama_gqa", "inputs.safetensors"))["input_ids"]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
    model = PeftModel.from_pretrained(base, os.path.join(case, "adapter"))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    ours = reference()
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


def main():
    torch.set_num_threads(1)
    check("bellows_written",
          lambda: load_file(os.path.join(HERE, "bellows_written", "bellows_logits.safetensors"))["logits"])
    check("bellows_combined",
          lambda: load_file(os.path.join(HERE, "weighted_adapters", "expected.safetensors"))["logits_linear"])


if __name__ == "__main__":
    main()
