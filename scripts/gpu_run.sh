#!/usr/bin/env bash
# Everything a session with a GPU machine runs there, in one call (no network there:
# the machine carries torch, triton, ninja, pytest and pytest-benchmark).
#   device run: bash scripts/gpu_run.sh
# Installs the package (building the CUDA extension), runs the test suite on the GPU,
# then the benchmark suite at full size, writing benchmarks/results/<device>/ into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashsloth-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -5 | tee "$OUT/install.log"
python3 -m pytest -q -x ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -40
OUT="$OUT" bash scripts/gpu_sanitize.sh 2>&1 | tail -20
python3 -m benchmarks --device cuda --dtype bfloat16 --out "$OUT/results" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -60
