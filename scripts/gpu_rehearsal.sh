#!/usr/bin/env bash
# The production path rehearsed on one GPU without Ray (scripts/gpu_rehearsal.py says what it
# runs), within 8 minutes. On the lent GPU machine, whose image has torch but not DeepSpeed
# or webdataset, carry the wheels that scripts/gpu_wheels.sh builds into .gpu-wheels/.
# Usage: bash scripts/gpu_rehearsal.sh [--smoke] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
# the checkout is the package where it is not installed (the GPU machine: its own torch, no venv)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -d .gpu-wheels ] && ! "$PY" -c "import deepspeed, webdataset" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index .gpu-wheels/*.whl
fi
# DeepSpeed's JIT builder cannot parse the "9.0a" that some images put in TORCH_CUDA_ARCH_LIST
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST//9.0a/9.0}"; fi
export RAY_AUTH_MODE=disabled
exec timeout "${REHEARSAL_TIMEOUT:-480}" "$PY" scripts/gpu_rehearsal.py "$@"
