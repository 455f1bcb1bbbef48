#!/usr/bin/env bash
# Step time and peak memory per rank of DDP, ZeRO-1, ZeRO-2 and FSDP on N processes (default 2):
# full fine-tuning of the small Llama (configs/bench/zero-small.toml). Prints one line per
# strategy; record the results (with the load average) in docs/BENCHMARKS.md.
# usage: [STRATEGIES="ddp fsdp"] [EXTRA="--set dist.prefetch=false"] scripts/zero-bench.sh [nproc] [path/to/bellows]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
BIN=${2:-target/release/bellows}
OUT=$(mktemp -d)
echo "load $(cut -d' ' -f1-3 /proc/loadavg); $N processes"
for s in ${STRATEGIES:-ddp zero1 zero2 fsdp}; do
    log="$OUT/$s.log"
    "$BIN" launch --nproc-per-node "$N" configs/bench/zero-small.toml \
        --set dist.strategy=$s --set run.output_dir="\"$OUT/$s\"" ${EXTRA:-} > "$log" 2>&1
    tps=$(grep -o 'tok/s [0-9]*' "$log" | tail -n +3 | awk '{s+=$2; n++} END {printf "%.0f", s/n}')
    rss=$(grep -o 'rank [0-9]*: peak RSS [0-9]* MiB while training' "$log" | sort | awk '{print $5}' | tr '\n' ' ')
    end=$(grep -o 'done: .*peak RSS [0-9]* MiB' "$log" | grep -o 'RSS [0-9]*' | awk '{print $2}' | tr '\n' ' ')
    held=$(grep -o 'holds [0-9]* bytes' "$log" | awk '{printf "%.1f ", $2/1048576}' || true)
    weights=$(grep -o 'rank [0-9]* holds [0-9]* of their [0-9]* elements' "$log" | awk '{printf "%.1f/%.1f ", $4*4/1048576, $7*4/1048576}' || true)
    echo "$s: tokens/s (steps 3-6, all ranks) $tps; peak RSS per rank while training MiB (rank 0, 1, ...): $rss(with the final save: $end); optimizer MiB per rank: ${held:-whole state on every rank}; sharded weights MiB per rank (of whole): ${weights:-not sharded}"
done
rm -rf "$OUT"
