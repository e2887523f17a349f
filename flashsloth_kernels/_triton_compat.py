"""Compatibility fixes for Triton, applied once by every module that defines kernels."""

from __future__ import annotations

import functools

from . import _env


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
