#!/usr/bin/env bash
# Creates .venv and installs the project into it. `--dev` adds the test tools.
# torch==2.13.0 goes in first (a CPU build from this machine's local disk), so the project's
# torch range is already met and no install pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".${extra}"
echo "set up: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
