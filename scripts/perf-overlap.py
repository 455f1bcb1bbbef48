#!/usr/bin/env python3
"""What the pool's other thread was doing while the loop's thread ran each part of the step.

Used for the "other thread idle while the loop's thread ran ..." numbers in docs/BENCHMARKS.md
(sixth session):

    perf record -D 3500 -F 999 --call-graph dwarf,16384 -o step.data \
        <release build with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only> \
        bench --mode lora --threads 2 --warmup 2 --steps 6
    perf script -i step.data > step.script
    python3 scripts/perf-overlap.py step.script

The first thread id in the dump is the loop's thread (the pool's first thread), the second the
other pool thread. Each of the loop thread's samples is classed by its innermost bellows frame
(the op it was in) and paired with the other thread's sample nearest in time (within 0.6 ms):
`busy` when that sample is in bellows, burn or gemm code, `idle` when it is in rayon's or
`warm::wait_for_work`'s search for work (or asleep: `nosample`). An op with many `idle` pairs
leaves the other thread waiting: serial code, or a parallel pass whose halves are uneven.
"""
import bisect
import collections
import re
import sys

from perf_samples import read

OPS = re.compile(
    r"(attention_kernel::(forward|backward|rotate_heads)|swiglu\w*::(forward|backward)"
    r"|cross_entropy::(forward|backward)|rms_norm_kernel::(forward|backward)|adamw"
    r"|lora_side::(forward|backward)|linear::(forward|backward)|binary_op|add_inplace)"
)


def main(path):
    samples = read(path)
    tids = sorted({s[0] for s in samples}, key=int)
    loop, other = tids[0], tids[1]
    theirs = sorted(((t, fr) for tid, t, fr in samples if tid == other), key=lambda x: x[0])
    times = [t for t, _ in theirs]
    counts = collections.Counter()
    for tid, t, frames in samples:
        if tid != loop:
            continue
        op = next((m.group(1) for m in map(OPS.search, frames) if m), "?")
        i = bisect.bisect_left(times, t)
        near = [j for j in (i - 1, i) if 0 <= j < len(times)]
        if not near:
            continue
        j = min(near, key=lambda j: abs(times[j] - t))
        if abs(times[j] - t) > 0.0006:
            counts[(op, "nosample")] += 1
            continue
        busy = any(
            ("bellows" in f and "warm::" not in f) or "gemm" in f or "burn" in f
            for f in theirs[j][1]
        )
        counts[(op, "busy" if busy else "idle")] += 1
    ops = sorted({o for o, _ in counts}, key=lambda o: -(counts[(o, "busy")] + counts[(o, "idle")]))
    print(f"{'loop thread in':32s} {'busy':>6s} {'idle':>6s} {'nosample':>8s}")
    for o in ops:
        print(f"{o:32s} {counts[(o, 'busy')]:6d} {counts[(o, 'idle')]:6d} {counts[(o, 'nosample')]:8d}")


if __name__ == "__main__":
    main(sys.argv[1])
