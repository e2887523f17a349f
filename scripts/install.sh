#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch (CPU build, pinned), Triton (pinned to the
# GPU machines' version), build tools, then this package with its C++ extension and
# every extra (model, bench, test). Safe to re-run. A torch already installed (a CUDA build,
# say) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install torch==2.13.0          # the CPU build; an unpinned torch pulls CUDA wheels
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install triton==3.6.0          # the version the GPU machines carry
fi
"$PY" -m pip install "setuptools>=64" wheel ninja
"$PY" -m pip install --no-build-isolation -e ".[all]"   # model, bench, test extras: everything
