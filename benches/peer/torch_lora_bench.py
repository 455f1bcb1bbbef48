#!/usr/bin/env python3
"""Peer benchmark: PyTorch + PEFT training throughput on CPU, to compare bellows against.

    python benches/peer/torch_lora_bench.py --mode lora --dtype f32 --threads 2
    python benches/peer/torch_lora_bench.py --mode lora --dtype bf16      # CPU autocast bf16
    python benches/peer/torch_lora_bench.py --mode full                   # full fine-tune
    python benches/peer/torch_lora_bench.py --mode tiny                   # seconds-long smoke run
    python benches/peer/torch_lora_bench.py --mode gemm                   # torch.matmul rate, one line per product

Model (lora/full): Llama, hidden 512, 8 layers, 8 heads, 4 kv heads, intermediate 1376, vocab 8192,
seq 256, batch 4, random init (no hub). lora: PEFT LoRA r=16, alpha=32, dropout 0, all linear layers
except lm_head ('all-linear'), AdamW on the adapters only. full: AdamW on every parameter. tiny: LoRA on a
tiny Llama (hidden 64, 2 layers, 4/2 heads, intermediate 128, vocab 128, seq 32, batch 2) as a smoke test.
AdamW: lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 0.0; loss = HF causal-LM loss on random tokens.
Each step = zero_grad, forward, loss, backward, optimizer step. Warm-up steps are not timed.

FLOP accounting (printed as model_gflops_per_sec). N = parameters of the matmuls (every Linear in the
layers + lm_head; the embedding lookup is a gather and is not counted; attention score/value products are
not counted either, as in the usual 6N rule):
  full:  6 * N * tokens                       (fwd 2N, bwd activation grads 2N, bwd weight grads 2N)
  lora:  (4 * N + 6 * N_lora) * tokens         (frozen base: fwd 2N + activation grads 2N, no weight grads;
                                                adapters: 6 * N_lora, N_lora = trainable LoRA params)
Prints exactly one JSON line on stdout (gemm: one per product of GEMM_CASES, the list of
`bellows bench --mode gemm`, crates/trainer/src/bench_gemm.rs: keep the two in step).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)


# (name, batch, m, k, n, rhs stored [n, k] and transposed)
GEMM_CASES = [
    ("square-2048", 1, 2048, 2048, 2048, False),
    ("q-proj", 1, 1024, 512, 512, True),
    ("kv-proj", 1, 1024, 512, 256, True),
    ("up-proj", 1, 1024, 512, 1376, True),
    ("down-proj", 1, 1024, 1376, 512, True),
    ("lm-head", 1, 1024, 512, 8192, True),
    ("up-proj-dx", 1, 1024, 1376, 512, False),
    ("lm-head-dx", 1, 1024, 8192, 512, False),
    ("lora-a", 1, 1024, 512, 16, True),
    ("lora-b", 1, 1024, 16, 512, True),
    ("attn-scores", 32, 256, 64, 256, True),
    ("attn-values", 32, 256, 256, 64, False),
]


def gemm_bench(torch, dtype, threads):
    """torch.matmul GFLOP/s on GEMM_CASES: 2 untimed products, then repetitions for ~0.3 s (>= 3)."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    for name, batch, m, k, n, rhs_t in GEMM_CASES:
        a = torch.randn(batch, m, k).to(dt)
        b = torch.randn(batch, n, k).to(dt) if rhs_t else torch.randn(batch, k, n).to(dt)

        def product():
            bb = b.transpose(1, 2) if rhs_t else b
            if batch == 1:
                return a[0] @ bb[0]
            return a @ bb

        for _ in range(2):
            product()
        times = []
        start = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < 0.3:
            t0 = time.perf_counter()
            product()
            times.append(time.perf_counter() - t0)
        flop = 2.0 * batch * m * k * n
        print(json.dumps({"mode": "gemm", "case": name, "dtype": dtype, "shape": [batch, m, k, n],
                          "gflops_per_sec": flop / (sum(times) / len(times)) / 1e9,
                          "gflops_per_sec_best": flop / min(times) / 1e9,
                          "reps": len(times), "threads": threads}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["lora", "full", "tiny", "gemm"], default="lora")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    import transformers
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(a.seed)
    if a.mode == "gemm":
        gemm_bench(torch, a.dtype, a.threads)
        return

    if a.mode == "tiny":
        cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
        batch, seq = 2, 32
    else:
        cfg = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4)
        batch, seq = 4, 256
    config = LlamaConfig(max_position_embeddings=max(seq, 256), tie_word_embeddings=False, **cfg)
    model = LlamaForCausalLM(config)  # random init, f32 weights
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_total = sum(p.numel() for p in model.parameters())

    lora = a.mode in ("lora", "tiny")
    if lora:
        lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()

    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    tokens = batch * seq

    def step():
        opt.zero_grad(set_to_none=True)
        if a.dtype == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    losses = []
    for _ in range(a.warmup):
        losses.append(step())
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)

    if lora:
        flops_per_token = 4 * n_matmul + 6 * n_train
        formula = "(4*N + 6*N_lora) * tokens"
    else:
        flops_per_token = 6 * n_matmul
        formula = "6*N*tokens"
    total = sum(times)
    tps = tokens * a.steps / total
    out = {
        "bench": "torch_lora_bench",
        "mode": a.mode,
        "dtype": a.dtype,
        "threads": a.threads,
        "batch": batch,
        "seq": seq,
        "warmup_steps": a.warmup,
        "timed_steps": a.steps,
        "step_time_s_mean": total / a.steps,
        "step_time_s_median": statistics.median(times),
        "step_time_s_min": min(times),
        "tokens_per_sec": tps,
        "model_gflops_per_sec": flops_per_token * tps / 1e9,
        "flops_formula": formula,
        "n_matmul_params": n_matmul,
        "n_total_params": n_total,
        "n_trainable_params": n_train,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "load_avg_1m_at_end": os.getloadavg()[0],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
