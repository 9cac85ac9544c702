#!/usr/bin/env bash
# Everything a GPU lease is for, in one command on the GPU machine, from the repository root:
#
#     bash scripts/gpu_lease.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else bench_out
#
# 1. versions: GPU, driver, python, torch, triton, nvcc;
# 2. the first-use build of the kernels (C++ and CUDA, for $TORCH_CUDA_ARCH_LIST, default 9.0)
#    into a fresh cache, timed;
# 3. benchmarks/gpu_check.py: the CUDA test files (concurrently), the loss benchmark beside the
#    peers (Liger-Kernel, installed from wheels/ when `make gpu-wheels` put it there: carry that
#    folder with the run), kernels per call and the fused LM head, bounded by $GPU_CHECK_TIMEOUT
#    seconds (default 540).
# The log is tee'd to OUT_DIR/gpu_lease.log, the benchmark CSV written to OUT_DIR/gpu_check.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export FUSED_LS_CACHE=${FUSED_LS_CACHE:-/tmp/fused_ls_cache}
py=${PY:-python3}
{
    # the peers, side by side (the GPU machine has no network): wheels/ from `make gpu-wheels`
    for whl in wheels/*.whl; do
        [ -e "$whl" ] && "$py" -m pip install -q --no-deps "$whl" && echo "installed $whl"
    done
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)"
    nvcc --version | tail -2
    t=$(date +%s)
    "$py" -m fused_ls.build
    echo "build: rc=$? in $(($(date +%s) - t)) s"
    # shellcheck disable=SC2086 # GPU_CHECK_ARGS: extra arguments, word-split on purpose
    timeout "${GPU_CHECK_TIMEOUT:-540}" "$py" benchmarks/gpu_check.py ${GPU_CHECK_ARGS:-} \
        --test-timeout "${TEST_TIMEOUT:-240}" --out "$out"
    echo "gpu_check: rc=$?"
} 2>&1 | tee "$out/gpu_lease.log"
