"""Every environment variable the package reads, read here and nowhere else.

The table in README.md ("Environment variables") documents each one. Values are
read at call time (not cached at import) so tests and users can change them.
Build-time flags (FLASHSLOTH_SKIP_CUDA_BUILD, FLASHSLOTH_FORCE_CUDA,
FLASHSLOTH_SKIP_CPP_BUILD) are read by setup.py, and again here for the JIT build.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def default_backend() -> str:
    """FLASHSLOTH_BACKEND: the backend used when a call passes backend=None."""
    value = os.environ.get("FLASHSLOTH_BACKEND", "auto").strip().lower() or "auto"
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
    value = os.environ.get("FLASHSLOTH_CPU_POOL_MB", "").strip()
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
    value = os.environ.get("FLASHSLOTH_CPU_ISA", "auto").strip().lower() or "auto"
    if value not in CPU_ISAS:
        raise ValueError(
            f"FLASHSLOTH_CPU_ISA={value!r} is not an instruction-set variant; expected one of "
            f"{', '.join(CPU_ISAS)}"
        )
    return value
