#!/usr/bin/env bash
# Issue 8's check: `make test` on N fresh clones of this repository, one after another, while a CPU-heavy
# neighbour (`python -m kvcourse.bench --quick` in a loop, from this checkout's .venv) shares the machine.
# Usage: bash tools/fresh_clone_check.sh [N=3] [WORKDIR=/tmp/kvcourse-fresh]
# Writes WORKDIR/runK.log (commit, start/end load average, make test output, rc, seconds) and WORKDIR/summary.log.
set -u
n=${1:-3}
work=${2:-/tmp/kvcourse-fresh}
repo=$(git -C "$(dirname "${BASH_SOURCE[0]}")/.." rev-parse --show-toplevel)
mkdir -p "$work"
rm -f "$work/done" "$work/summary.log"

(  # the neighbour: quick benchmarks until the runs are over
  cd "$repo" || exit 1
  while [ ! -e "$work/done" ]; do
    HF_HUB_OFFLINE=1 .venv/bin/python -m kvcourse.bench --quick --out "$work/bench-out" --no-progress >> "$work/bench.log" 2>&1
  done
) &
neighbour=$!

for k in $(seq 1 "$n"); do
  rm -rf "$work/clone$k"
  git clone -q "$repo" "$work/clone$k"
  start=$(date +%s)
  {
    echo "commit $(git -C "$work/clone$k" rev-parse --short HEAD) start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$work/clone$k" && PYTEST_ADDOPTS="--durations=30" make test)
    rc=$?
    echo "rc=$rc seconds=$(( $(date +%s) - start )) end $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  } > "$work/run$k.log" 2>&1
  tail -n 1 "$work/run$k.log" | sed "s/^/run $k: /" >> "$work/summary.log"
done
touch "$work/done"
wait "$neighbour"
cat "$work/summary.log"
