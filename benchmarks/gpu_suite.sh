#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md (sections 1, 2, 3, 5 and the launch profile), one after
# another, each bounded in time, everything appended to one log: $LOG (default gpu-bench.log).
# Usage: PYTHON=python3 LOG=/tmp/bench.log bash benchmarks/gpu_suite.sh [quick]
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
log=${LOG:-gpu-bench.log}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
step() {  # step SECONDS ARGS...: run one benchmark with a time limit, log its output
    local limit=$1; shift
    echo "== $(date +%T) $*" | tee -a "$log"
    timeout "$limit" "$py" "$@" 2>&1 | grep -v -i "warn" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
"$py" -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$log"
step 120 benchmarks/launches.py --top 8
step 120 benchmarks/backbone.py --task segmentation --repeats 20
step 120 benchmarks/backbone.py --task segmentation --repeats 20 --bf16
step 120 benchmarks/backbone.py --task segmentation --repeats 10 --bf16 --batch 8
step 120 benchmarks/peer.py --repeats 20
step 120 benchmarks/peer.py --repeats 20 --bf16
step 120 benchmarks/peer.py --repeats 10 --bf16 --batch 8
step 120 benchmarks/attention.py --repeats 20 --bf16 --grid 128
step 120 benchmarks/attention.py --repeats 20 --bf16 --grid 128 --tokens 87040
step 240 benchmarks/memory.py --bf16
if [ "${1:-}" != quick ]; then
    step 240 benchmarks/peer.py --repeats 20 --bf16 --compile
fi
