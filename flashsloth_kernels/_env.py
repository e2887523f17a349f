"""Every environment variable the package reads, read here and nowhere else.

The table in README.md ("Environment variables") documents each one. Values are
read at call time (not cached at import) so tests and users can change them.
Build-time flags (FLASHSLOTH_SKIP_CUDA_BUILD, FLASHSLOTH_FORCE_CUDA,
FLASHSLOTH_SKIP_CPP_BUILD) are read by setup.py, and again here for the JIT build.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple, TypeVar

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

_T = TypeVar("_T")


# The variables read on every op call (FLASHSLOTH_BACKEND, FLASHSLOTH_CPU_ISA,
# FLASHSLOTH_CPU_POOL_MB) go through _parsed: os.environ.get encodes the key and decodes the
# value on each call (~0.8 us; with the parsing, these reads were ~2.5 us of the ~20 us of
# Python a query_patch_attention call costs). On POSIX CPython os.environ keeps the
# environment in a dict of bytes (``_data``) that every write through os.environ (and pytest's
# monkeypatch) updates: the raw value is looked up there and parsed once per distinct value.
# Anywhere else (another platform or interpreter, os.environ replaced by a plain mapping),
# through os.environ.get.
_POSIX = os.name == "posix"
_KEYS: Dict[str, bytes] = {}
# (variable, raw value) -> parsed value; an invalid value raises on every call (never cached)
_PARSED: Dict[Tuple[str, object], object] = {}


def _raw(name: str) -> object:
    """The variable's raw value (bytes or str) or None, as a cache key."""
    env = os.environ
    data = getattr(env, "_data", None)
    if _POSIX and type(data) is dict:
        key = _KEYS.get(name)
        if key is None:
            key = _KEYS[name] = os.fsencode(name)
        return data.get(key)
    return env.get(name)


def _parsed(name: str, parse: Callable[[Optional[str]], _T]) -> _T:
    """parse(os.environ.get(name)), remembered per raw value."""
    key = (name, _raw(name))
    try:
        return _PARSED[key]  # type: ignore[return-value]
    except KeyError:
        pass
    value = parse(os.environ.get(name))
    if len(_PARSED) > 256:  # a program sets few values; never let this grow without bound
        _PARSED.clear()
    _PARSED[key] = value
    return value


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def default_backend() -> str:
    """FLASHSLOTH_BACKEND: the backend used when a call passes backend=None."""
    return _parsed("FLASHSLOTH_BACKEND", _parse_backend)


def _parse_backend(raw: Optional[str]) -> str:
    value = (raw or "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"FLASHSLOTH_BACKEND={value!r} is not a backend; expected one of {', '.join(BACKENDS)}"
        )
    return value


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton's own switch; Triton kernels then run on CPU tensors."""
    return _flag("TRITON_INTERPRET")


def skip_cuda_build() -> bool:
    """FLASHSLOTH_SKIP_CUDA_BUILD=1: never build the CUDA extension (setup.py and JIT)."""
    return _flag("FLASHSLOTH_SKIP_CUDA_BUILD")


def force_cuda_build() -> bool:
    """FLASHSLOTH_FORCE_CUDA=1: build the CUDA extension even with no GPU visible."""
    return _flag("FLASHSLOTH_FORCE_CUDA")


def jit_build_allowed() -> bool:
    """FLASHSLOTH_NO_JIT=1: never compile the CUDA extension on first use."""
    return not _flag("FLASHSLOTH_NO_JIT") and not skip_cuda_build()


def torchrun_env() -> tuple:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them; (1, 0, 0) outside torchrun."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def kill_at_write_step() -> int:
    """FLASHSLOTH_TEST_KILL_AT_WRITE=N (tests only): the trainer SIGKILLs itself at the N-th
    step of its checkpoint writes (flashsloth.training.checkpoints); 0 / unset: never."""
    value = os.environ.get("FLASHSLOTH_TEST_KILL_AT_WRITE", "0").strip() or "0"
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"FLASHSLOTH_TEST_KILL_AT_WRITE={value!r}: expected an integer >= 0")
    return n


CPU_POOL_MB_DEFAULT = 512


def cpu_pool_mb() -> int:
    """FLASHSLOTH_CPU_POOL_MB: how many MiB of released output buffers the C++ CPU kernels keep
    for reuse (csrc/common/cpu_pool.h; default 512, 0 turns the pool off). Outputs of 1 MiB or
    more are drawn from the pool: a fresh multi-MB tensor is page-faulted in page by page on its
    first write, which cost the B = 16 attention backward half its time."""
    return _parsed("FLASHSLOTH_CPU_POOL_MB", _parse_pool_mb)


def _parse_pool_mb(raw: Optional[str]) -> int:
    value = (raw or "").strip()
    if not value:
        return CPU_POOL_MB_DEFAULT
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"FLASHSLOTH_CPU_POOL_MB={value!r}: expected an integer >= 0 (MiB)")
    return n


CPU_ISAS = ("auto", "avx512bf16", "avx512", "avx2", "baseline")


def cpu_isa() -> str:
    """FLASHSLOTH_CPU_ISA: the instruction-set variant of the C++ CPU kernels.

    "auto" (default) runs the widest variant the CPU supports; "avx512bf16" (AVX-512 with
    AVX512-BF16: the attention's bf16 forward computes its scores with vdpbf16ps; SAP runs its
    avx512 kernels under this name), "avx512", "avx2" or "baseline"
    force one (a variant the CPU cannot run is an error when a kernel is called). Forcing
    "avx2" or "baseline" also keeps the SAP kernel off oneDNN's 16-bit GEMMs, which need
    AVX-512, so every CPU-dependent path of both ops can be tested on one machine.
    """
    return _parsed("FLASHSLOTH_CPU_ISA", _parse_isa)


def _parse_isa(raw: Optional[str]) -> str:
    value = (raw or "auto").strip().lower() or "auto"
    if value not in CPU_ISAS:
        raise ValueError(
            f"FLASHSLOTH_CPU_ISA={value!r} is not an instruction-set variant; expected one of "
            f"{', '.join(CPU_ISAS)}"
        )
    return value
