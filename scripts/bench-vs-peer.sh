#!/usr/bin/env bash
# Runs bellows' `bench` and the PyTorch + PEFT peer script back to back on the same shapes and
# threads, printing one JSON line each with the load average, for docs/BENCHMARKS.md.
# usage: PYTHON=tests/golden/.venv/bin/python scripts/bench-vs-peer.sh [modes...]   (default: tiny lora full)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BELLOWS=${BELLOWS:-target/release/bellows}
THREADS=${THREADS:-2}
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(tiny lora full)
for m in "${modes[@]}"; do
  steps=6; [ "$m" = tiny ] && steps=40
  echo "# $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg) mode $m"
  "$BELLOWS" bench --mode "$m" --threads "$THREADS" --warmup 2 --steps "$steps" | sed 's/^/bellows /'
  "$PYTHON" benches/peer/torch_lora_bench.py --mode "$m" --dtype f32 --threads "$THREADS" --warmup 2 --steps "$steps" | sed 's/^/peer    /'
done
