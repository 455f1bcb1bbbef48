#!/usr/bin/env bash
# The unattended GPU host check (issue #10): golden-model parity on CUDA vs the CPU and
# transformers, the measured matmul peak, CPU-vs-GPU loss curves in f32 and bf16, a world-size-1
# NCCL all-reduce, LoRA training benchmarks of a 1.1B Llama (bf16 and f32) with tokens/s,
# MFU against the measured peak and peak GPU memory, and a QLoRA (NF4) training benchmark.
# No network; under 10 minutes on an H100/H200.
#
# usage: scripts/gpu-check.sh [path/to/bellows]      (default: target/release/bellows)
#   build: CUDARC_CUDA_VERSION=13000 cargo build --release -p bellows-launch --features cuda
#   env:   OUT_DIR (default: $OUT, else ./gpu-check-out), CUDA_PATH (default: found below)
# Writes $OUT_DIR/gpu-check.jsonl (one JSON object per finding), bench-*.json, gpu-mem-*.csv,
# env.txt, and exits non-zero if any check failed. Record the numbers in docs/BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-${BELLOWS_BIN:-target/release/bellows}}")
OUT_DIR=${OUT_DIR:-${OUT:-gpu-check-out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(realpath "$OUT_DIR")
LINKS=$(mktemp -d)
START=$(date +%s)

# --- find the CUDA libraries: system paths first, then Python's nvidia-* wheels -------------
PY_SITES=$(python3 - 2>/dev/null <<'PY'
import site, sys
for p in site.getsitepackages() + [site.getusersitepackages()]:
    print(p)
PY
)
SEARCH="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/local/nvidia/lib"
for s in $PY_SITES; do
    [ -d "$s/nvidia" ] && SEARCH="$SEARCH $(find "$s/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ' ')"
done
find_lib() { # $1 = library stem, e.g. libnvrtc; prints the first match
    local f
    f=$(ldconfig -p 2>/dev/null | awk -v n="$1" '$1 ~ "^"n"\\.so" {print $NF; exit}')
    if [ -n "$f" ] && [ -e "$f" ]; then echo "$f"; return; fi
    for d in $SEARCH; do
        for f in "$d/$1.so" "$d"/"$1".so.[0-9]*; do
            if [ -e "$f" ]; then echo "$f"; return; fi
        done
    done
}
LD_EXTRA=""
for stem in libcuda libnvrtc libnccl; do
    f=$(find_lib $stem)
    if [ -z "$f" ]; then
        echo "gpu-check: $stem not found in: ldconfig, $SEARCH" >&2
        [ $stem = libnccl ] || exit 2
        continue
    fi
    # cudarc dlopens the unversioned name (and libX.so.<cuda major>): give it a link.
    ln -sf "$f" "$LINKS/$stem.so"
    LD_EXTRA="$LD_EXTRA:$(dirname "$f")"
    echo "$stem: $f"
    [ $stem = libnccl ] && export BELLOWS_NCCL_PATH="$f"
done
export LD_LIBRARY_PATH="$LINKS$LD_EXTRA${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# cubecl compiles kernels with NVRTC and needs CUDA's headers (cuda_bf16.h, ...).
if [ -z "${CUDA_PATH:-}" ]; then
    for c in /usr/local/cuda /opt/cuda $(for s in $PY_SITES; do echo "$s/nvidia/cu13" "$s/nvidia/cuda_runtime"; done); do
        if [ -f "$c/include/cuda_bf16.h" ]; then export CUDA_PATH=$c; break; fi
    done
fi
echo "CUDA_PATH=${CUDA_PATH:-<not found>}"

{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "CUDA_PATH=${CUDA_PATH:-}"
    "$BIN" env 2>&1
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"

# --- GPU memory sampling (nvidia-smi every 100 ms) around a command ---------------------------
sample() { # $1 = label, rest = command; prints the command's stdout, records peak MiB
    local label=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT_DIR/gpu-mem-$label.csv" 2>/dev/null &
    local smi=$!
    "$@"
    local rc=$?
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    local peak
    peak=$(sort -n "$OUT_DIR/gpu-mem-$label.csv" | tail -1)
    echo "{\"check\":\"gpu_memory\",\"ok\":true,\"phase\":\"$label\",\"peak_mib\":${peak:-null}}" >> "$OUT_DIR/gpu-check.jsonl"
    return $rc
}

FAIL=0
: > "$OUT_DIR/gpu-check.jsonl"
# 1. parity, peak, loss curves, NCCL (no benchmark).
export RUST_BACKTRACE=1
sample check timeout 300 "$BIN" gpu-check --device cuda --bench-steps 0 --out "$(mktemp -d)" \
    | tee -a "$OUT_DIR/gpu-check.jsonl" || FAIL=1
PEAK=$(grep '"check":"matmul_peak"' "$OUT_DIR/gpu-check.jsonl" | sed -E 's/.*"bf16_tflops":([0-9.eE+-]+).*/\1/')
PEAK_ARG=""
[ -n "$PEAK" ] && PEAK_ARG="--peak-tflops $PEAK"
# 2. LoRA r16 on a 1.1B Llama (TinyLlama shape), batch 4 x 1024 tokens: bf16, then f32.
for prec in bf16 f32; do
    sample "bench-$prec" timeout 150 "$BIN" bench --device cuda --mode lora-1b --precision $prec \
        --warmup 2 --steps 5 $PEAK_ARG > "$OUT_DIR/bench-$prec.json" || FAIL=1
    cat "$OUT_DIR/bench-$prec.json"
    sed 's/^{/{"check":"bench","ok":true,/' "$OUT_DIR/bench-$prec.json" >> "$OUT_DIR/gpu-check.jsonl"
done
# 3. QLoRA (NF4 base, dequantized on the GPU in forward and backward) on the small Llama, bf16.
sample "bench-qlora" timeout 120 "$BIN" bench --device cuda --mode qlora --precision bf16 \
    --warmup 2 --steps 5 $PEAK_ARG > "$OUT_DIR/bench-qlora.json" || FAIL=1
cat "$OUT_DIR/bench-qlora.json"
sed 's/^{/{"check":"bench","ok":true,/' "$OUT_DIR/bench-qlora.json" >> "$OUT_DIR/gpu-check.jsonl"
echo "{\"check\":\"wall\",\"ok\":true,\"secs\":$(( $(date +%s) - START ))}" >> "$OUT_DIR/gpu-check.jsonl"
grep -q '"ok":false' "$OUT_DIR/gpu-check.jsonl" && FAIL=1
echo "gpu-check: $( [ $FAIL = 0 ] && echo PASS || echo FAIL ) in $(( $(date +%s) - START )) s; results in $OUT_DIR"
exit $FAIL
