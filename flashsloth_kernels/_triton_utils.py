"""What every Triton backend shares: SM count, device guard, dot precision, padding, and the
compatibility fix the interpreter needs (applied once by every module that defines kernels).

Imported only by the ``fused_triton`` modules (it imports Triton).
"""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch
import triton

from . import _env

# SMs assumed for a CPU tensor under the interpreter (an H100's count), so heuristics that
# size grids by the SM count take the same branches as on the GPU the code is written for.
DEFAULT_SM_COUNT = 132


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (DEFAULT_SM_COUNT for a non-CUDA device)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())


def device_guard(t: torch.Tensor) -> ContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s for the call (a no-op when
    it already is, and on CPU under the interpreter)."""
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot for operands of ``dtype``: "ieee" (exact fp32 products;
    tf32 would miss the fp32 reference by ~3e-4) for float32. 16-bit operands ignore the
    setting; "tf32" is Triton's default, the form every Triton version accepts."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pad_dim(d: int, minimum: int = 16) -> int:
    """``d`` padded to a power of two >= ``minimum`` (tl.dot needs K >= 16 for 16-bit inputs)."""
    return max(minimum, triton.next_power_of_2(d))


@functools.lru_cache(maxsize=None)
def fix_interpreter_scalar_index() -> None:
    """Let Triton 3.6's interpreter run loops with runtime bounds under NumPy >= 2.4.

    The interpreter holds scalars as 1-element arrays and turns them into loop bounds with
    int(array), which NumPy 2.4 made a TypeError (triton-lang/triton#9171, fixed upstream by
    #9172 after 3.6), so every ``range(start, end)`` over kernel arguments fails. This applies
    the upstream fix (take the single element) for the interpreter only; compiled kernels
    never see it, and nothing happens under NumPy < 2.4 or when not interpreting.
    """
    if not _env.triton_interpret():
        return
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # NumPy < 2.4: nothing to fix
    except TypeError:
        pass
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
