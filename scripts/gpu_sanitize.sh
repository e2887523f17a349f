#!/usr/bin/env bash
# On a GPU machine: NVIDIA compute-sanitizer over the cuda backend's kernels on the test shapes.
#
#   bash scripts/gpu_sanitize.sh                 # logs under $OUT (default /tmp/flashsloth-out)
#   TOOLS="memcheck" bash scripts/gpu_sanitize.sh
#
# The workload is `python tests/test_cuda_kernels.py --sanitize-run`: every SAP and attention
# forward shape of tests/test_cuda_kernels.py in fp32, fp16 and bf16, checked against the
# reference as well. Only kernels whose name contains flashsloth_cuda are instrumented (cuBLAS
# and torch's own kernels are not ours to check, and make racecheck very slow). The extension
# is loaded (installed, or JIT-built) before any tool runs, so no compilation happens under
# the sanitizer. Exit status: 0 when every tool reports no error, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flashsloth-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOOLS=${TOOLS:-"memcheck racecheck synccheck initcheck"}

SAN=$(command -v compute-sanitizer || true)
if [[ -z "$SAN" ]]; then
  for cand in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
      /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [[ -x "$cand" ]]; then SAN=$cand; break; fi
  done
fi
if [[ -z "$SAN" ]]; then
  echo "gpu_sanitize: compute-sanitizer not found (it ships with the CUDA toolkit)" | tee "$OUT/sanitize.log"
  exit 1
fi

if ! "$PY" -c '
import sys
from flashsloth_kernels import _cuda_ext
err = _cuda_ext.load_error()
print("gpu_sanitize: extension:", err or _cuda_ext.loaded_from())
sys.exit(1 if err else 0)
' 2>&1 | tee "$OUT/sanitize.log"; then
  exit 1
fi

STATUS=0
for tool in $TOOLS; do
  log="$OUT/sanitize_$tool.log"
  extra=()
  if [[ $tool == initcheck ]]; then extra=(--track-unused-memory no); fi
  echo "gpu_sanitize: $tool ..." | tee -a "$OUT/sanitize.log"
  "$SAN" --tool "$tool" --error-exitcode 99 --kernel-name kns=flashsloth_cuda "${extra[@]}" \
      "$PY" tests/test_cuda_kernels.py --sanitize-run >"$log" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
  echo "gpu_sanitize: $tool exit $rc ${summary}" | tee -a "$OUT/sanitize.log"
  if [[ $rc -ne 0 ]]; then
    STATUS=1
    tail -40 "$log"
  fi
done
exit $STATUS
