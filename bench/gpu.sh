#!/usr/bin/env bash
# The seed's acceptance configurations on a CUDA GPU, in one command (issue 12):
#   Qwen2.5-1.5B shapes with random weights (no download), bfloat16, LoRA r=64; B in {16,32} x G in {4,8} with 100
#   new tokens, and G=8 with 512 new tokens. Records measured peak memory (torch.cuda.max_memory_allocated) against
#   funcprobe's memory planner and the δH₁ / plain-step time ratio, and appends the table to bench/RESULTS.md.
# Without CUDA it runs a CPU smoke test at reduced shapes (seconds) and appends nothing.
#
#   bash bench/gpu.sh [--only 16x8x512] [--budget 40GB] [--out table.md] [--no-append]
#
# Needs a CUDA build of torch in the environment (PYTHON=/path/to/python to choose one; default: .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "$PY" bench/gpu_acceptance.py "$@"
