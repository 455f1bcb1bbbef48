"""Reads a `perf script` dump (recorded with `--call-graph`) into samples, for
`perf-frames.py` and `perf-overlap.py`."""
import re


def read(path):
    """Every sample as `(thread id, time in seconds, frames innermost first)`, each frame's
    symbol without its offset and library."""
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
                m = re.match(r"\s*(\S+)\s+(\d+)\s+(?:\[\d+\]\s+)?([\d.]+):", line)
                cur = (m.group(2), float(m.group(3)), []) if m else None
                continue
            parts = line.strip().split(None, 1)
            if len(parts) < 2 or cur is None:
                continue
            sym = re.sub(r"\+0x[0-9a-f]+", "", parts[1])
            cur[2].append(re.sub(r" \(.*\)$", "", sym))
    if cur:
        samples.append(cur)
    return samples
