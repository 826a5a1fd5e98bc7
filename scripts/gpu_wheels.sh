#!/usr/bin/env bash
# Builds .gpu-wheels/: the pure-Python packages the GPU rehearsal needs that a bare CUDA image
# (torch, numpy, tqdm, pyyaml, safetensors) lacks, for CPython 3.12, about 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu-wheels "deepspeed==0.19.8"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels \
  webdataset braceexpand hjson "pydantic>=2" pydantic-core annotated-types typing-inspection \
  "typing-extensions>=4.16" einops msgpack py-cpuinfo
ls -la .gpu-wheels
