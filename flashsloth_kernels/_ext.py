"""Guarded loading of the compiled extensions.

A missing extension is not an error at import: the backends that need it report
why they cannot run (see ``_dispatch``), and "auto" picks another.
"""

from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def _load(module: str):
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
        return None, f"{type(exc).__name__}: {exc}"


def ext_error(module: str) -> str | None:
    """None when the compiled extension ``module`` (e.g. flashsloth_kernels.sap._C) imports,
    else why not."""
    return _load(module)[1]


def cpu_ops(module: str):
    """torch.ops.flashsloth after loading the CPU extension ``module`` (raises if missing)."""
    mod, err = _load(module)
    if mod is None:
        raise RuntimeError(f"{module} is not available ({err}); "
                           "reinstall with `pip install --no-build-isolation -e .`")
    import torch

    return torch.ops.flashsloth


@functools.lru_cache(maxsize=None)
def triton_error() -> str | None:
    """None when Triton imports, else why not."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return None
