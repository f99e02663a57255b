#!/usr/bin/env bash
# The streaming bench (python -m streaming.bench) on this checkout and on an earlier revision, one
# run at a time, on services of their own ports, with the two models of BENCHMARKS.md (Streaming).
# Run it alone on the machine: nothing else may share the cores.
#
#   bench/stream_before_after.sh BEFORE_REV [OUT_DIR]
#
# Needs the bench services and models first (see BENCHMARKS.md, "Fourth round"):
#   .run/bench-stream (factor 0.2) and .run/bench-stream-f1 (factor 1).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
BEFORE_REV=${1:?give the revision to compare with, e.g. 2bf663d}
OUT=${2:-$ROOT/.run/bench-results}
BEFORE=$ROOT/.run/worktree-$BEFORE_REV
mkdir -p "$OUT"
if [ ! -d "$BEFORE" ]; then
  git worktree add --detach "$BEFORE" "$BEFORE_REV" >/dev/null
  ln -s "$ROOT/.venv" "$BEFORE/.venv"
  ln -s "$ROOT/.cache" "$BEFORE/.cache"
fi
export RECO__RUN_DIR=$ROOT/.run/bench-stream RECO__MODEL_STORE__URI=$ROOT/.run/bench-stream/models \
       RECO__KAFKA__LOCAL__PORT=29092 RECO__KAFKA__LOCAL__CONTROLLER_PORT=29093 \
       RECO__KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:29092 \
       RECO__DYNAMODB__LOCAL__PORT=28000 RECO__DYNAMODB__ENDPOINT_URL=http://127.0.0.1:28000 \
       RECO__STREAMING__METRICS__PORT=0
F1="RECO__MODEL_STORE__URI=$ROOT/.run/bench-stream-f1/models"

run() {  # name checkout [VAR=value ...] -- bench arguments
  local name=$1 dir=$2; shift 2
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "== $name $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  # PYTHONPATH: the Python workers import that checkout's packages too, not the installed ones.
  (cd "$dir" && env "${envs[@]}" PYTHONPATH="$dir" .venv/bin/python -m streaming.bench "$@" \
     --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1)
  echo "   exit $? $(date -u +%H:%M:%S)"
}

run after_f02_r200_topic   "$ROOT"   X=1 -- --rate 200 --duration 90 --warmup 30 --no-table
run before_f02_r200_topic  "$BEFORE" X=1 -- --rate 200 --duration 90 --warmup 30 --no-table
run after_f02_r1000_topic  "$ROOT"   X=1 -- --rate 1000 --duration 90 --warmup 30 --no-table
run before_f02_r1000_topic "$BEFORE" X=1 -- --rate 1000 --duration 90 --warmup 30 --no-table
run after_f1_r1000_topic   "$ROOT"   "$F1" -- --rate 1000 --duration 90 --warmup 30 --no-table
run after_f1_r200_topic    "$ROOT"   "$F1" -- --rate 200 --duration 90 --warmup 30 --no-table
run after_f02_r3000_topic  "$ROOT"   X=1 -- --rate 3000 --duration 60 --warmup 30 --no-table
run after_f02_r1000_both   "$ROOT"   X=1 -- --rate 1000 --duration 60 --warmup 30
echo "== done $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
