"""Loading of the CUDA extension (the ``cuda`` backend's kernels: the CUDA kernels of the
``torch.ops.flashsloth.*_fwd`` ops).

The extension is one shared library built from ``csrc/**/*.cu`` and ``csrc/**/*_cuda.cpp``. Its
kernels register themselves with ``TORCH_LIBRARY_IMPL(flashsloth, CUDA, ...)`` for the schemas
the ops' op.py define, so loading the library is all it takes; it has no Python module body.
Where it comes from, in order:

1. ``flashsloth_kernels/_cuda*.so``, built by ``setup.py`` when a CUDA toolkit and a CUDA build
   of torch were present at install time;
2. otherwise a JIT build on first use (``torch.utils.cpp_extension.load`` with ninja, cached
   under torch's extension directory), when torch has CUDA, nvcc and ninja are found, the
   sources are present (a source checkout or editable install: wheels do not ship ``csrc/``),
   and neither FLASHSLOTH_NO_JIT=1 nor FLASHSLOTH_SKIP_CUDA_BUILD=1 is set.

Nothing is loaded or built at import. :func:`cuda_reasons` is the dispatcher's reasons
function of the ``cuda`` backend: it answers from cheap checks for non-CUDA inputs and only
loads (or builds) the extension once CUDA tensors ask. A failed load is remembered: the
build is not retried on every call.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import List, Optional

import torch

from . import _env

_INSTALLED_MODULE = "flashsloth_kernels._cuda"
_JIT_NAME = "flashsloth_kernels_cuda_jit"
# The flags of setup.py's CUDAExtension.
_NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
_CXX_FLAGS = ["-O3", "-std=c++17"]
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_loaded_from: Optional[str] = None  # the library's path, or the JIT build's name, once loaded
_load_error: Optional[str] = None   # why loading failed, once tried


def csrc_dir() -> Path:
    """The csrc/ folder beside the package (present in a source checkout / editable install)."""
    return Path(__file__).resolve().parent.parent / "csrc"


def sources() -> List[Path]:
    """The extension's sources: every .cu and every *_cuda.cpp under csrc/ (setup.py's list)."""
    root = csrc_dir()
    if not root.is_dir():
        return []
    return sorted(root.glob("**/*.cu")) + sorted(root.glob("**/*_cuda.cpp"))


def _installed_library() -> Optional[str]:
    try:
        spec = importlib.util.find_spec(_INSTALLED_MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _jit_blockers() -> List[str]:
    """Why a JIT build cannot be attempted here (empty: it can)."""
    why = []
    if not _env.jit_build_allowed():
        why.append("JIT builds are off (FLASHSLOTH_NO_JIT=1 or FLASHSLOTH_SKIP_CUDA_BUILD=1)")
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if torch.version.cuda is None:
        why.append("torch is a build without CUDA")
    elif CUDA_HOME is None:  # torch looks for the toolkit only in its CUDA builds
        why.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if not is_ninja_available():
        why.append("ninja is not installed (pip install ninja)")
    if not sources():
        why.append(f"the CUDA sources are not present ({csrc_dir()} is missing: install from a "
                   "source checkout with `pip install --no-build-isolation -e .`)")
    return why


def _jit_build() -> str:
    from torch.utils.cpp_extension import load

    # TORCH_CUDA_ARCH_LIST and MAX_JOBS are read by torch itself (default: the visible GPUs).
    load(
        name=_JIT_NAME,
        sources=[str(p) for p in sources()],
        extra_include_paths=[str(csrc_dir())],
        extra_cflags=_CXX_FLAGS,
        extra_cuda_cflags=_NVCC_FLAGS,
        is_python_module=False,
        verbose=False,
    )
    return f"JIT build {_JIT_NAME}"


def _load() -> Optional[str]:
    """Load the library once (installed first, else JIT); returns None or why it failed."""
    global _loaded_from, _load_error
    if _loaded_from is not None or _load_error is not None:
        return _load_error
    with _lock:
        if _loaded_from is not None or _load_error is not None:
            return _load_error
        not_built = "the CUDA extension is not built"
        path = _installed_library()
        if path is not None:
            try:
                torch.ops.load_library(path)
                _loaded_from = path
                return None
            except Exception as exc:  # an ABI mismatch with this torch, say
                not_built = (f"the installed CUDA extension {path} does not load "
                             f"({type(exc).__name__}: {exc})")
        blockers = _jit_blockers()
        if blockers:
            _load_error = f"{not_built} and cannot be JIT-built ({'; '.join(blockers)})"
            return _load_error
        try:
            _loaded_from = _jit_build()
        except Exception as exc:
            _load_error = f"{not_built} and its JIT build failed ({type(exc).__name__}: {exc})"
        return _load_error


def load_error() -> Optional[str]:
    """None once the extension is loaded (loading or JIT-building it first if needed), else
    why it cannot be."""
    return _load()


def loaded_from() -> Optional[str]:
    """Where the loaded library came from (a path, or the JIT build's name); None if not loaded."""
    return _loaded_from


def ops():
    """torch.ops.flashsloth, loading the CUDA extension first; raises RuntimeError if it cannot."""
    err = _load()
    if err is not None:
        raise RuntimeError(err)
    return torch.ops.flashsloth


def cuda_reasons(device: torch.device, dtype: torch.dtype, **facts) -> List[str]:
    """Why the ``cuda`` backend cannot run a problem on ``device`` in ``dtype`` (empty: it can).

    Cheap for non-CUDA inputs: the extension is loaded (or JIT-built, which takes minutes
    once) only for CUDA tensors of a supported dtype on a CUDA build of torch. ``facts`` are
    accepted for the dispatcher's interface; the kernels take every shape the ops' public
    functions accept.
    """
    why = []
    if device.type != "cuda":
        why.append(f"the cuda backend needs CUDA tensors, got device {device.type!r}")
    if torch.version.cuda is None:
        why.append("torch has no CUDA (a CPU-only build)")
    elif not torch.cuda.is_available():
        why.append("torch has CUDA but no CUDA device is available")
    if dtype not in SUPPORTED_DTYPES:
        why.append(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
    if not why:
        err = _load()
        if err is not None:
            why.append(err)
    return why
