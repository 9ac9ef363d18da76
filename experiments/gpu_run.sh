#!/usr/bin/env bash
# One prepared command for one NVIDIA GPU (docs/benchmarks/gpu/README.md):
#   experiments/gpu_run.sh            # ≤ 5 min on an H100/H200, offline
#   experiments/gpu_run.sh --smoke    # the same code on tiny sizes (CPU)
# Every fresh process it starts reads the allocator's peak, which needs
# XLA_PYTHON_CLIENT_PREALLOCATE=false; nothing outside the working tree.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" experiments/gpu_run.py "$@"
