"""Guarded loading of the compiled extensions.

A missing extension is not an error at import: the backends that need it report
why they cannot run (see ``_dispatch``), and "auto" picks another.
"""

from __future__ import annotations

import functools
import importlib

from . import _env


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


class IsaSwitch:
    """The instruction-set variant of one op's C++ CPU kernels (csrc/common/cpu_isa.h) and the
    size of their output pool (csrc/common/cpu_pool.h), applied from FLASHSLOTH_CPU_ISA and
    FLASHSLOTH_CPU_POOL_MB before each call (read at call time, set in C++ only on change).
    ``prefix`` names the op's C++ queries: ``<prefix>_isa``, ``<prefix>_set_isa``,
    ``<prefix>_supported_isas``, ``<prefix>_pool_stats``, ``<prefix>_set_pool_limit`` in
    torch.ops.flashsloth."""

    def __init__(self, module: str, prefix: str) -> None:
        self._module, self._prefix, self._applied, self._pool_mb = module, prefix, "", -1

    def _op(self, suffix: str):
        return getattr(cpu_ops(self._module), f"{self._prefix}_{suffix}")

    def supported(self) -> tuple:
        """The variants compiled in that this CPU can run, widest first."""
        return tuple(self._op("supported_isas")())

    def apply(self) -> None:
        want, pool_mb = _env.cpu_isa(), _env.cpu_pool_mb()
        if pool_mb != self._pool_mb:
            self._op("set_pool_limit")(pool_mb << 20)
            self._pool_mb = pool_mb
        if want == self._applied:
            return
        if want != "auto" and want not in self.supported():
            raise ValueError(f"FLASHSLOTH_CPU_ISA={want!r}: this CPU (or build) cannot run that "
                             f"variant; it can run: {', '.join(self.supported())} (or auto)")
        self._op("set_isa")(want)
        self._applied = want

    def current(self) -> str:
        """The variant the kernels run with (after applying FLASHSLOTH_CPU_ISA)."""
        self.apply()
        return self._op("isa")()

    def pool_stats(self) -> dict:
        """The output pool's bytes: ``live`` (in tensors now), ``idle`` (kept for reuse) and
        ``limit`` (the most idle bytes it keeps), after applying FLASHSLOTH_CPU_POOL_MB."""
        self.apply()
        live, idle, limit = self._op("pool_stats")()
        return {"live": live, "idle": idle, "limit": limit}
