# Sourced by scripts/gpu_checks.sh and benchmarks/gpu_suite.sh, which set $py (the Python to
# run) and $log (the file every step appends to).
step() {  # step SECONDS COMMAND...: one command with a time limit, its output (warnings dropped) logged
    local limit=$1; shift
    echo "== $(date +%T) [${limit} s] $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | grep -v -i "warn" | tee -a "$log"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}
machine_header() {  # the GPU, torch, CUDA, Triton and the code's commit, logged first
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      "$py" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
      git log -1 --format='code %h %cd' 2>/dev/null; } 2>&1 | tee -a "$log"
}
