#!/usr/bin/env bash
# GPU day one: every GPU path checked and timed in one command (bench/gpu_day_one.py says what runs).
#   bench/gpu_day_one.sh [OUT_DIR]     on a CUDA machine; the report lands in OUT_DIR (default bench/out/gpu_day_one)
#   bench/gpu_day_one.sh --plan        anywhere: every command parses, the plan and its time budget
# Python: $PYTHON, else the first of .venv/bin/python, python3 whose torch sees a GPU, else the first with torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for probe in "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" "import torch"; do
    for cand in .venv/bin/python python3; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "$probe" >/dev/null 2>&1; then PY=$cand; break 2; fi
    done
  done
fi
if [ -z "$PY" ]; then
  echo "error: no Python with torch found (set PYTHON=/path/to/python)" >&2
  exit 2
fi
exec "$PY" bench/gpu_day_one.py "$@"
