#!/usr/bin/env bash
# Pipeline tokens/s and peak RSS vs dataset size (issue 6): writes a small and a multi-GB pre-tokenized
# Parquet file under $TMPDIR (default /tmp), reads one epoch of each in its own process, prints one line
# per run with the 1-minute load average, and deletes the files.
# usage: BIN=target/debug/examples/throughput scripts/data-scale-bench.sh [big_rows] [modes...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/examples/throughput}
DIR=${TMPDIR:-/tmp}
BIG=${1:-2200000}
shift || true
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(pad-truncate pack)
small="$DIR/bellows-scale-10000.parquet"
big="$DIR/bellows-scale-$BIG.parquet"
trap 'rm -f "$small" "$big"' EXIT
load() { cut -d' ' -f1 /proc/loadavg; }
for spec in "10000 $small" "$BIG $big"; do
  set -- $spec
  t0=$(date +%s)
  nice -n 10 "$BIN" write "$1" "$2"
  echo "# write $1 rows: $(( $(date +%s) - t0 )) s, $(du -h "$2" | cut -f1), load $(load)"
done
for m in "${modes[@]}"; do
  for f in "$small" "$big"; do
    echo "# load $(load) $(basename "$f") $m"
    nice -n 10 "$BIN" read "$f" "$m"
  done
done
