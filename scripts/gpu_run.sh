#!/usr/bin/env bash
# What a session with a GPU machine runs there (no network there: the machine carries
# torch, triton, ninja, pytest and pytest-benchmark). The device tool allows 10 minutes a
# command and returns at most 8 files from $OUT, so the work comes in two stages, one call
# each, and each stage packs its logs and results into one tarball:
#
#   device run: bash scripts/gpu_run.sh test    # install (builds the CUDA extension), tests, sanitizer
#   device run: bash scripts/gpu_run.sh bench   # install if needed, full benchmark suite
#
# Unpack $OUT/gpu-<stage>.tar.gz here; commit benchmarks/results/<device>/ from the bench stage.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-test}
OUT=${OUT:-/tmp/flashsloth-out}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
python3 -m pip install --no-build-isolation --no-deps -e . >"$LOGS/install.log" 2>&1 \
  || { tail -30 "$LOGS/install.log"; }
case "$STAGE" in
  test)
    timeout 420 python3 -m pytest -q -x ${PYTEST_ARGS:-} 2>&1 | tee "$LOGS/pytest.log" | tail -40
    OUT="$LOGS/sanitize" timeout 150 bash scripts/gpu_sanitize.sh 2>&1 | tail -20
    ;;
  bench)
    timeout 540 python3 -m benchmarks --device cuda --dtype bfloat16 --out "$OUT/results" ${BENCH_ARGS:-} \
      2>&1 | tee "$LOGS/bench.log" | tail -80
    ;;
  *) echo "usage: gpu_run.sh test|bench" >&2; exit 2 ;;
esac
tar -czf "$OUT/gpu-$STAGE.tar.gz" -C "$OUT" $(cd "$OUT" && ls -d logs results 2>/dev/null)
rm -rf "$LOGS" "$OUT/results"
