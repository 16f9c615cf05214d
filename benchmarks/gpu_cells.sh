#!/usr/bin/env bash
# accuracy.py cells on the lent GPU machine, one process per cell (the route that ran on 2026-11-27):
#
#   OUT="$OUT" bash benchmarks/gpu_cells.sh SECONDS CELL [CELL...] [-- accuracy.py arguments]
#
# CELL is task/method/seed (e.g. dbpedia/clip_k8/13). Run it on a machine where benchmarks/gpu_run.sh
# has installed onnxruntime-gpu into /tmp/site (an earlier call on the same warm machine). Each cell runs
# as `benchmarks/cuda_run.py benchmarks/accuracy.py --device cuda --out $ACC --cells CELL` in a process
# of its own, so a cell's sessions and GPU memory go with its process whatever else holds them. ACC
# (default /tmp/acc) outlives the call on a warm machine, so a later call continues where this one stopped
# (finished cells are skipped). No cell starts once SECONDS have passed; then ACC is copied into OUT and
# packed for the trip back (benchmarks/pack_out.py: runs/ -> runs.tar.gz). The status line of each cell
# goes to stdout, its whole log to $ACC/logs/.
# Env: OUT (packed when set, as the device tool sets it; default benchmarks/results/accuracy_gpu, not
# packed), ACC, PY (default python3), DEVICE (default cuda; cpu for a dry run here).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
  echo "usage: bash benchmarks/gpu_cells.sh SECONDS CELL [CELL...] [-- accuracy.py arguments] (CELL = task/method/seed)" >&2
  exit 2
fi
limit=$1; shift
cells=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do cells+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
PACK=${OUT:+1}  # the device tool's $OUT: pack what would not come back (pack_out.py packs only outside the repo)
OUT=${OUT:-benchmarks/results/accuracy_gpu}
ACC=${ACC:-/tmp/acc}
PY=${PY:-python3}
mkdir -p "$OUT" "$ACC/logs"
. benchmarks/gpu_env.sh
rc=0
for c in "${cells[@]}"; do
  if [ "$SECONDS" -gt "$limit" ]; then echo "[gpu_cells] stop before $c: ${SECONDS} s passed (limit ${limit} s)"; break; fi
  log="$ACC/logs/${c//\//_}.log"
  "$PY" -u benchmarks/cuda_run.py benchmarks/accuracy.py --device "${DEVICE:-cuda}" --out "$ACC" --cells "$c" "$@" \
    > "$log" 2>&1
  status=$?
  echo "[gpu_cells] $c exit status $status at ${SECONDS} s: $(grep -E '^\[accuracy\] 1/1|^accuracy\.py:' "$log" | tail -1)"
  if [ "$status" -ne 0 ]; then rc=$status; tail -3 "$log"; break; fi
done
cp -r "$ACC/." "$OUT/"
if [ -n "$PACK" ]; then "$PY" benchmarks/pack_out.py "$OUT"; fi
exit "$rc"
