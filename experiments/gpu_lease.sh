#!/usr/bin/env bash
# Everything one GPU lease should measure, in one command (at most 8m40s:
# the three parts' timeouts; docs/benchmarks/gpu/README.md):
#   experiments/gpu_lease.sh [OUT]          # default OUT: docs/benchmarks/gpu
#   SMOKE=1 experiments/gpu_lease.sh /tmp/x # the same sequence, tiny (CPU)
# METHODS and MAX_BATCH_METHODS override gpu_run.py's rows and searches.
# 1. experiments/gpu_eigh.py: cuSOLVER's eigen-solvers at the Grams' sizes,
#    and the last four MobileNetV2 layers under each lv.set_gpu_eigh choice.
# 2. gpu_run.py, step/layers/peak, with the faster choice
#    (LOWRANK_VJP_GPU_EIGH), compiling into a compilation cache kept for 3.
# 3. gpu_run.py, step/peak again on that cache: its processes load the
#    programs instead of compiling and autotuning them, so their allocator
#    peaks are the steps' own (the first pass's include autotuning scratch).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-docs/benchmarks/gpu}"
PY="${PYTHON:-python}"
S=${SMOKE:+--smoke}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
CACHE="$(mktemp -d)"
trap 'rm -rf "$CACHE"' EXIT
T0=$(date +%s)
stamp() { echo "[gpu_lease $(( $(date +%s) - T0 )) s] $*"; }

stamp "solvers"
timeout 120 "$PY" experiments/gpu_eigh.py $S --out "$OUT"
stamp "solvers: exit $?"
RESULT="$(ls -t "$OUT"/gpu_eigh_*.json 2>/dev/null | head -1)"
CHOICE=""
if [ -n "$RESULT" ]; then
  CHOICE="$("$PY" experiments/gpu_eigh.py --choice "$RESULT")"
fi
export LOWRANK_VJP_GPU_EIGH="$CHOICE"
stamp "LOWRANK_VJP_GPU_EIGH='$CHOICE' (from ${RESULT:-no result})"

# The largest compiles start first; vanilla is the ratios' base.
M=${METHODS:-vanilla,hosvd-0.9,asi,svd-0.9,quant-8,gradfilter,checkpoint,hosvd-0.8}
MB=${MAX_BATCH_METHODS-vanilla,hosvd-0.9,asi}
stamp "pass 1"
timeout 270 experiments/gpu_run.sh $S --methods "$M" --cache-dir "$CACHE" \
  --max-batch-methods "$MB" --budget-s 240 --out "$OUT"
stamp "pass 1: exit $?"
stamp "pass 2 (programs loaded from pass 1's cache)"
timeout 130 experiments/gpu_run.sh $S --methods "$M" --cache-dir "$CACHE" \
  --sections step,peak --max-batch-methods "" --budget-s 120 --out "$OUT"
stamp "pass 2: exit $?"
