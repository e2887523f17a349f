#!/usr/bin/env bash
# CI (no GPU, nvcc present): compile every csrc/**/*.cu for sm_80 and sm_90, compile only, with
# the flags of the real build (setup.py's nvcc flags plus the ones torch's CUDAExtension adds),
# then syntax-check the torch bindings csrc/**/*_cuda.cpp against torch's headers. Any error
# fails the script. Objects go to a temporary folder that is removed on exit.
#
#   bash scripts/check_cuda_compile.sh            # from anywhere
#   CUDA_ARCHS="80 86 90" bash scripts/...        # other architectures (compute capability x10)
#
# The .cu files include only CUDA headers (a CPU wheel of torch ships incomplete CUDA headers:
# no c10/cuda/impl/cuda_cmake_macros.h, no cuBLAS/cuSPARSE), so they compile with nvcc alone.
# The bindings include c10/cuda headers; the missing generated macro header is skipped with
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE, which only matters on Windows. The bindings are skipped
# (with a note) where python, torch or the CUDA runtime headers are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHS=${CUDA_ARCHS:-"80 90"}
JOBS=$(nproc 2>/dev/null || echo 2)

if ! command -v nvcc >/dev/null 2>&1; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    PATH="$CUDA_HOME/bin:$PATH"
  else
    echo "check_cuda_compile: nvcc not found (put it on PATH or set CUDA_HOME)" >&2
    exit 1
  fi
fi

mapfile -t CU_FILES < <(find csrc -name '*.cu' | sort)
mapfile -t BINDINGS < <(find csrc -name '*_cuda.cpp' | sort)
if [[ ${#CU_FILES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no .cu files under csrc/" >&2
  exit 1
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# setup.py's nvcc flags, plus what torch's CUDAExtension adds (half/bfloat16 operators off,
# relaxed constexpr), so that code passing here also passes the real build.
NVCC_FLAGS=(-O3 -std=c++17 --use_fast_math -lineinfo
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr -Xcompiler -fPIC -I csrc)

echo "check_cuda_compile: $(nvcc --version | tail -1)"
echo "check_cuda_compile: ${#CU_FILES[@]} .cu file(s) x sm_{${ARCHS// /,}}, ${JOBS} job(s)"

# One job per (file, architecture); each prints its result and leaves a .fail file on error.
# (The flags hold no spaces inside an item, so they travel to the jobs as one string.)
export NVCC_FLAGS_STR="${NVCC_FLAGS[*]}" TMP
compile_one() {
  local src=$1 arch=$2
  local obj="$TMP/$(echo "$src" | tr '/' '_').sm_$arch.o"
  local t0=$SECONDS
  # shellcheck disable=SC2086
  if nvcc $NVCC_FLAGS_STR -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" -o "$obj" \
      >"$obj.log" 2>&1; then
    echo "  ok    $src sm_$arch ($((SECONDS - t0)) s)"
  else
    echo "  FAIL  $src sm_$arch"
    sed 's/^/        /' "$obj.log"
    touch "$obj.fail"
  fi
}
export -f compile_one

T0=$SECONDS
for src in "${CU_FILES[@]}"; do
  for arch in $ARCHS; do
    printf '%s\0%s\0' "$src" "$arch"
  done
done | xargs -0 -n 2 -P "$JOBS" bash -c 'compile_one "$0" "$1"'
FAILED=0
if compgen -G "$TMP/*.fail" >/dev/null; then FAILED=1; fi

# Bindings: syntax-only against torch's headers and the CUDA runtime headers.
PY=${PYTHON:-python3}
if [[ ${#BINDINGS[@]} -gt 0 ]]; then
  TORCH_INC=$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null || true)
  CUDA_INC=""
  for cand in "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include \
      "$(dirname "$(command -v nvcc)")/../include"; do
    if [[ -f "$cand/cuda_runtime_api.h" ]]; then CUDA_INC=$cand; break; fi
  done
  first_inc=${TORCH_INC%% *}
  if [[ -z "$TORCH_INC" || -z "$CUDA_INC" || ! -f "$first_inc/c10/cuda/CUDAGuard.h" ]]; then
    echo "check_cuda_compile: bindings not checked (needs torch with c10/cuda headers and the CUDA runtime headers)"
  else
    INC_FLAGS="-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -I csrc -isystem $CUDA_INC"
    for d in $TORCH_INC; do INC_FLAGS+=" -isystem $d"; done
    export INC_FLAGS
    check_binding() {
      local src=$1
      local log="$TMP/$(echo "$src" | tr '/' '_').log"
      local t0=$SECONDS
      # shellcheck disable=SC2086
      if "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra $INC_FLAGS "$src" >"$log" 2>&1; then
        echo "  ok    $src (syntax, $((SECONDS - t0)) s)"
      else
        echo "  FAIL  $src (syntax)"
        sed 's/^/        /' "$log"
        touch "$log.fail"
      fi
    }
    export -f check_binding
    printf '%s\0' "${BINDINGS[@]}" | xargs -0 -n 1 -P "$JOBS" bash -c 'check_binding "$0"'
    if compgen -G "$TMP/*.fail" >/dev/null; then FAILED=1; fi
  fi
fi

if [[ $FAILED -ne 0 ]]; then
  echo "check_cuda_compile: FAILED ($((SECONDS - T0)) s)"
  exit 1
fi
echo "check_cuda_compile: all passed ($((SECONDS - T0)) s)"
