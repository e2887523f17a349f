#!/usr/bin/env bash
# What a session with a GPU machine runs there (no network there: the machine carries torch,
# triton, ninja, pytest, pytest-xdist, pytest-timeout and pytest-benchmark). The device tool
# allows 10 minutes a command, 15 minutes of device time a session (machine start included)
# and returns at most 8 files from $OUT, so:
#
#   device run: bash scripts/gpu_run.sh all     # one call: install, GPU kernel tests, sanitizer,
#                                               # benchmark (ops + 3.2B model), the whole suite
#   device run: bash scripts/gpu_run.sh test    # install, the whole suite, all sanitizer tools
#   device run: bash scripts/gpu_run.sh bench   # install, the full benchmark suite
#
# Every step has its own time limit inside the call's (LIMIT_S, default 560 s: the tool's
# 600 s less a margin), so a slow step costs its own results only. After every step the logs
# and results so far are packed into $OUT/gpu-<stage>.tar.gz, so a call cut off at its limit
# still returns everything finished before. Unpack it here; commit the benchmark's
# results/<device>/ under benchmarks/results/<device>/, and say in the notes which steps ran.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
OUT=${OUT:-/tmp/flashsloth-out}
WORK=${GPU_RUN_WORK:-/tmp/flashsloth-gpu-run}
LOGS="$WORK/logs"
RESULTS="$WORK/results"
LIMIT_S=${LIMIT_S:-560}
T0=$SECONDS
rm -rf "$WORK"
mkdir -p "$OUT" "$LOGS" "$RESULTS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}

pack() {  # the tarball holds everything so far; written to a temporary name, then renamed
  tar -czf "$OUT/.gpu-$STAGE.tar.gz.tmp" -C "$WORK" logs results 2>/dev/null \
    && mv -f "$OUT/.gpu-$STAGE.tar.gz.tmp" "$OUT/gpu-$STAGE.tar.gz"
}

left() { echo $((LIMIT_S - (SECONDS - T0))); }

# step NAME SECONDS CMD...: runs CMD under min(SECONDS, time left - 10 s), logs it, packs.
step() {
  local name=$1 want=$2
  shift 2
  local avail=$(($(left) - 10))
  local lim=$((want < avail ? want : avail))
  if ((lim < 15)); then
    echo "== $name: skipped (${avail}s left)" | tee -a "$LOGS/steps.txt"
    return 0
  fi
  local t=$SECONDS
  echo "== $name (limit ${lim}s, $(left)s left)" | tee -a "$LOGS/steps.txt"
  timeout --kill-after=5 "$lim" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t))s" | tee -a "$LOGS/steps.txt"
  tail -${TAIL_LINES:-25} "$LOGS/$name.log"
  pack
  return 0
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)'
  nproc
} >"$LOGS/machine.txt" 2>&1
cat "$LOGS/machine.txt"

# the package and its extensions (CPU and CUDA), built here against this machine's torch
step install 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
"$PY" -c 'from flashsloth_kernels import _cuda_ext; print("cuda extension:", _cuda_ext.load_error() or _cuda_ext.loaded_from())' \
  2>&1 | tee -a "$LOGS/steps.txt"

PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider --timeout 300)
WORKERS=${PYTEST_WORKERS:-12}
case "$STAGE" in
  all)
    # the GPU kernels first (cuda, triton compiled for real, the contract, autocast) ...
    step kernel-tests 150 "${PYTEST[@]}" -n 8 tests/test_cuda_kernels.py tests/test_contract.py \
      tests/test_sap.py tests/test_attention.py tests/test_autocast.py
    step sanitize 70 env OUT="$LOGS/sanitize" TOOLS="${SANITIZE_TOOLS:-memcheck}" \
      bash scripts/gpu_sanitize.sh
    # ... the numbers next: ops at full size and the 3.2B prefill (the bars' rows) ...
    step bench 230 "$PY" -m benchmarks --device cuda --dtype bfloat16 --only ops,model \
      --preset flashsloth-3.2b --compression "${BENCH_COMPRESSION:-none,flashsloth,sap,visionzip}" \
      --out "$RESULTS" ${BENCH_ARGS:-}
    # ... then the rest of the suite with whatever time is left
    step suite 400 "${PYTEST[@]}" -n "$WORKERS" \
      --ignore tests/test_cuda_kernels.py --ignore tests/test_contract.py \
      --ignore tests/test_sap.py --ignore tests/test_attention.py --ignore tests/test_autocast.py
    ;;
  test)
    step suite 420 "${PYTEST[@]}" -n "$WORKERS" ${PYTEST_ARGS:-}
    step sanitize 150 env OUT="$LOGS/sanitize" bash scripts/gpu_sanitize.sh
    ;;
  bench)
    step bench 540 "$PY" -m benchmarks --device cuda --dtype bfloat16 --out "$RESULTS" ${BENCH_ARGS:-}
    ;;
  *) echo "usage: gpu_run.sh all|test|bench" >&2; exit 2 ;;
esac
cat "$LOGS/steps.txt"
pack
