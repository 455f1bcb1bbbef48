#!/usr/bin/env bash
# Runs fuzz targets for a fixed number of executions (bounded in time), then minimises the corpus.
# Usage: fuzz/run.sh [RUNS] [MAX_SECS] [TARGET...]   (default: 1000000 runs, 900 s, every target)
# Prints one line per target: target, executions, seconds, crash file if any. Logs in fuzz/logs/.
set -u
cd "$(dirname "$0")"
runs=${1:-1000000}
secs=${2:-900}
shift 2 2>/dev/null || shift $#
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(job_config safetensors_file hf_config adapter_config store_frame loader_state manifest)
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  log="logs/$t.log"
  start=$(date +%s)
  cargo +nightly fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- \
    -runs="$runs" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crash=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/.* //')
  echo "$t rc=$rc execs=${execs:-?} secs=$took ${crash:+crash=$crash}"
done
