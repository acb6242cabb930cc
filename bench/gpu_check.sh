#!/usr/bin/env bash
# The device-machine checks, in one call: the opt-in GPU tests, then the GPU benchmark of the
# 3B-shaped pair (ours, ours with --stack 64 at the default budget and at --max-gpu-memory 2GB,
# reading every weight once, the floor, --max-gpu-memory 8GB and 2GB, the naive script).
# Usage on a CUDA machine: bash bench/gpu_check.sh [OUTDIR]
set -uo pipefail
OUTDIR="${1:-${OUT:-bench/results}}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUTDIR/gpu.txt"
python3 -c "import torch, safetensors, scipy, psutil, click; print('torch', torch.__version__)" | tee -a "$OUTDIR/gpu.txt"
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu-tests.log"
python3 -m bench.bench_transfer --pair 3b --device cuda --cases "${CASES:-ours,stack,stack2,read,floor,gpu8,gpu2,naive}" --data /tmp/benchdata --results "$OUTDIR" 2>&1 | tee "$OUTDIR/bench-3b-cuda.log"
