#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md (launch profile, sections 2, 1, 3, 5), one after
# another, each bounded in time, everything appended to one log: $LOG (default gpu-bench.log).
# Usage: PYTHON=python3 LOG=/tmp/bench.log bash benchmarks/gpu_suite.sh [quick]
set -u
cd "$(dirname "$0")/.."
# the checkout is the package where it is not installed (the GPU machine: its own torch, no venv)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
log=${LOG:-gpu-bench.log}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
source scripts/gpu_steps.sh
machine_header
# First the launch-cost questions (kernels per forward; latency with the launch cost removed
# by replaying a captured CUDA graph; one model per process at batch 8), then compile.
step 120 "$py" benchmarks/launches.py --top 8
step 240 "$py" benchmarks/launches.py --top 12 --bf16 --compile --models fixed peer
step 150 "$py" benchmarks/peer.py --repeats 20 --bf16 --cuda-graph
step 150 "$py" benchmarks/peer.py --repeats 10 --bf16 --batch 8 --cuda-graph
for m in fixed full peer; do
    step 90 "$py" benchmarks/peer.py --repeats 10 --bf16 --batch 8 --models $m
done
# Both compiled in one process (first calls ~75 s for DUPS, ~105 s for the peer on an H100):
# the peer cannot be captured by --cuda-graph (transformers copies host tensors in its forward).
step 420 "$py" benchmarks/peer.py --repeats 20 --bf16 --compile reduce-overhead --models fixed peer
if [ "${1:-}" != quick ]; then
    step 420 "$py" benchmarks/peer.py --repeats 10 --bf16 --batch 8 --compile reduce-overhead --models fixed peer
    step 120 "$py" benchmarks/backbone.py --task segmentation --repeats 20 --bf16
    step 120 "$py" benchmarks/backbone.py --task segmentation --repeats 10 --bf16 --batch 8
    step 120 "$py" benchmarks/attention.py --repeats 20 --bf16 --grid 128
    step 120 "$py" benchmarks/attention.py --repeats 20 --bf16 --grid 128 --tokens 87040
    step 240 "$py" benchmarks/memory.py --bf16
    step 150 "$py" benchmarks/packed.py --bf16 --batch 8 --repeats 10
    step 150 "$py" benchmarks/packed.py --bf16 --batch 8 --repeats 10 --bucket 0.1
    step 420 "$py" benchmarks/packed.py --bf16 --batch 8 --repeats 10 --bucket 0.1 --compile reduce-overhead
fi
