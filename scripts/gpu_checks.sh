#!/usr/bin/env bash
# A lent GPU's checks, sized to a short loan (about 15 minutes of device time, 1-2 of them the
# machine's start): parts of under 6 minutes each, in the order they matter, each step bounded
# in time and logged to $OUT/gpu-checks-PART.log (or ./gpu-checks-PART.log), so a cut-off run
# still says what it measured. The full benchmark set is benchmarks/gpu_suite.sh (~40 minutes).
#
#   bash scripts/gpu_wheels.sh             # here, once: .gpu-wheels/ (DeepSpeed, webdataset)
#   bash scripts/gpu_checks.sh rehearsal   # there, carrying .gpu-wheels: the fused kernel's
#                                          # tests natively, then the production path
#   bash scripts/gpu_checks.sh latency     # there: the fused kernel against gather + SDPA,
#                                          # DUPS-Tiny against the peer (graphed), memory
#   bash scripts/gpu_checks.sh compiled    # there, if minutes are left: both compiled
set -uo pipefail
cd "$(dirname "$0")/.."
# the checkout is the package where it is not installed (the GPU machine: its own torch, no venv)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
part=${1:?usage: gpu_checks.sh rehearsal|latency|compiled}
py=${PYTHON:-python3}
log=${OUT:-.}/gpu-checks-$part.log
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore RAY_AUTH_MODE=disabled
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST//9.0a/9.0}"; fi
source scripts/gpu_steps.sh
machine_header
case $part in
rehearsal)
    step 120 "$py" -m pytest -q -p no:cacheprovider tests/test_fused_attention.py
    step 300 env PYTHON="$py" REHEARSAL_TIMEOUT=290 bash scripts/gpu_rehearsal.sh --out /tmp/dups-rehearsal
    ;;
latency)
    step 60 "$py" benchmarks/attention.py --repeats 20 --bf16 --grid 64
    step 60 "$py" benchmarks/attention.py --repeats 20 --bf16 --grid 64 --tokens 87040
    step 90 "$py" benchmarks/peer.py --repeats 20 --bf16 --cuda-graph --models peer fixed fused
    step 90 "$py" benchmarks/peer.py --repeats 10 --bf16 --batch 8 --cuda-graph --models peer fixed fused
    step 45 "$py" benchmarks/memory.py --bf16 --batches 1 --steps 10 --warmup 10
    step 45 "$py" benchmarks/memory.py --bf16 --batches 1 --steps 10 --warmup 10 --backend fused
    step 45 "$py" benchmarks/launches.py --top 6 --bf16 --models peer fixed fused
    ;;
compiled)
    step 330 "$py" benchmarks/peer.py --repeats 20 --bf16 --compile reduce-overhead --models peer fixed fused
    ;;
*) echo "unknown part $part: rehearsal, latency or compiled" >&2; exit 2 ;;
esac
echo "== $(date +%T) done" | tee -a "$log"
