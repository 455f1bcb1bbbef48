#!/usr/bin/env python3
"""Shares of a `perf script` dump's samples on the busiest thread, by innermost matching frame.

Used for the "where the step goes" numbers in docs/BENCHMARKS.md:

    perf record -D 3500 -F 499 --call-graph dwarf,16384 -o step.data \
        <release build with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only> \
        bench --mode lora --threads 2 --warmup 2 --steps 6
    perf script -i step.data > step.script
    python3 scripts/perf-frames.py step.script \
        '(linear::forward|linear::backward|attention_kernel::forward|attention_kernel::backward|cross_entropy|swiglu|rms_norm|adamw|burn_optim|binary_op)'

Each row: percent of the thread's samples, (innermost frame matching the pattern, whether a
`gemm` frame is on the stack).
"""
import collections
import re
import sys


def main(path, pattern):
    samples, cur = [], None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                if cur:
                    samples.append(cur)
                cur = None
                continue
            if line[0] not in " \t":
                m = re.match(r"\s*(\S+)\s+(\d+)", line)
                cur = (m.group(2) if m else "?", [])
                continue
            parts = line.strip().split(None, 1)
            if len(parts) < 2 or cur is None:
                continue
            sym = re.sub(r"\+0x[0-9a-f]+", "", parts[1])
            cur[1].append(re.sub(r" \(.*\)$", "", sym))
    if cur:
        samples.append(cur)
    threads = collections.Counter(t for t, _ in samples)
    busiest = threads.most_common(1)[0][0]
    stacks = [s for t, s in samples if t == busiest]
    pat = re.compile(pattern)
    shares = collections.Counter()
    for s in stacks:
        key = next((m.group(0) for m in map(pat.search, s) if m), None)
        shares[(key, any("gemm" in f for f in s))] += 1
    print("samples by thread:", threads.most_common(4))
    for (key, gemm), n in shares.most_common(25):
        print(f"{100 * n / len(stacks):5.1f}%  {key}  gemm={gemm}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
