#!/usr/bin/env python3
"""Shares of a `perf script` dump's samples on the loop's thread, by innermost matching frame.

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

from perf_samples import read


def main(path, pattern):
    samples = [(tid, frames) for tid, _, frames in read(path)]
    threads = collections.Counter(t for t, _ in samples)
    # The loop's thread: the first one (the busiest too, until the pool's other threads
    # started looking for work actively between passes).
    loop = min(threads, key=int)
    stacks = [s for t, s in samples if t == loop]
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
