#!/usr/bin/env bash
# DDP step-time overhead on CPU: one process with batch 16 against `bellows launch` with 2 processes
# of batch 8 (the same tokens per step), back to back, on the quickstart job. Prints the mean
# tokens/s of logged steps after the first, and the load average.
set -euo pipefail
cd "$(dirname "$0")/.."
BELLOWS=${BELLOWS:-target/release/bellows}
STEPS=${STEPS:-60}
out=$(mktemp -d)
common=(--set "run.max_steps=$STEPS" --set run.log_every=10 --set run.eval_every=0 --set logging.progress=quiet --set logging.tensorboard=false)
rate() { python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][1:]; print(round(sum(x['tokens_per_sec'] for x in r)/len(r),1))" "$1"; }
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$BELLOWS" train configs/quickstart.toml "${common[@]}" --set data.batch_size=16 --set "run.output_dir=$out/one" 2>/dev/null
echo "1 process x batch 16: $(rate "$out/one/metrics.jsonl") tok/s"
"$BELLOWS" launch --nproc-per-node 2 configs/quickstart.toml "${common[@]}" --set data.batch_size=8 --set "run.output_dir=$out/two" >/dev/null 2>&1
echo "2 processes x batch 8: $(rate "$out/two/metrics.jsonl") tok/s"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$out"
