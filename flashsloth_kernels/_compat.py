"""Every private PyTorch API the package uses, in one place, each with a public fallback.

The private calls below only make fast paths or clearer errors possible; when one of them is
missing (a newer or older torch renamed it), its function answers the conservative way and the
op runs through its public path (``torch.library`` custom op), which is always correct.
``tests/test_op_scaffold.py`` runs both ways.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch.autograd import forward_ad

# Set to True (tests) to act as if none of the private APIs existed.
FORCE_FALLBACK = False


def _private(path: str) -> Optional[Callable]:
    """The private torch function at ``path`` (e.g. "_C._len_torch_dispatch_stack"), or None."""
    if FORCE_FALLBACK:
        return None
    return _lookup(path)


@functools.lru_cache(maxsize=None)
def _lookup(path: str) -> Optional[Callable]:
    # looked up once per path: these run on every eager call of an op (the attribute walk
    # cost ~1 us a call, several times per call)
    obj: object = torch
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if callable(obj) else None


_OBSERVER_PROBES = ("_C._len_torch_dispatch_stack", "_C._is_torch_function_mode_enabled",
                    "_C._are_functorch_transforms_active")


@functools.lru_cache(maxsize=None)
def _observer_probes() -> Optional[tuple]:
    fns = tuple(_lookup(path) for path in _OBSERVER_PROBES)
    return None if any(f is None for f in fns) else fns


def nothing_observes(*tensors: torch.Tensor) -> bool:
    """True when no dispatch mode, torch-function mode, functorch transform or tensor subclass
    could observe a call on ``tensors``: the eager bypass of a custom op (calling its host
    function directly) is then indistinguishable from the op. False whenever that cannot be
    established (a private API is missing), so the caller goes through the public op."""
    for t in tensors:
        if type(t) is not torch.Tensor:
            return False
    probes = None if FORCE_FALLBACK else _observer_probes()  # looked up once
    if probes is None:
        return False
    stack_len, fn_mode, transforms = probes
    return stack_len() == 0 and not fn_mode() and not transforms()


_is_tracing = getattr(torch._C, "_is_tracing", None)


def plain_eager(device_type: str, *tensors: torch.Tensor) -> bool:
    """True when a call on ``tensors`` (no None) on a ``device_type`` device runs in plain eager
    mode: :func:`nothing_observes`, no autocast region there (the ops follow CPU and CUDA
    autocast), no forward-AD level entered (so no dual tensor) and no TorchScript trace.
    Callers ask ``torch.compiler.is_compiling()`` first: under Dynamo this is never traced.
    False whenever that cannot be established."""
    if not nothing_observes(*tensors):
        return False
    level = getattr(forward_ad, "_current_level", None)  # private: unknown counts as entered
    if not isinstance(level, int) or level >= 0:
        return False
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return False
    # torch.jit.is_tracing() without its Python wrapper (~0.15 us a call) when present
    return not (_is_tracing() if _is_tracing is not None else torch.jit.is_tracing())


def functorch_transform(*kinds: str) -> Optional[str]:
    """The name ("grad", "jvp", "vmap", ...) of the innermost active torch.func transform among
    ``kinds``, or None. Fallback without the private interpreter stack: "transform" when any
    functorch transform is active and ``kinds`` is not only "vmap" (vmap is supported, so only
    a certain answer may reject it)."""
    active = _private("_C._are_functorch_transforms_active")
    if active is not None and not active():
        return None  # the common case, answered cheaply
    retrieve = _private("_functorch.pyfunctorch.retrieve_all_functorch_interpreters")
    if retrieve is not None:
        try:
            for interp in reversed(retrieve()):
                name = interp.key().name.lower()
                if name in kinds:
                    return name
            return None
        except Exception:  # an interpreter API that changed shape: fall back below
            pass
    if active is not None and active() and set(kinds) != {"vmap"}:
        return "transform"
    return None


def has_forward_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a forward-mode AD dual tensor (torch.autograd.forward_ad),
    through the public unpack_dual."""
    level = None if FORCE_FALLBACK else getattr(forward_ad, "_current_level", None)
    if isinstance(level, int) and level < 0:
        return False  # no dual level entered: no dual tensor can exist (the cheap answer)
    for t in tensors:
        if t is not None and forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def mkldnn_fast_gemm(dtype: torch.dtype) -> bool:
    """Whether oneDNN has a fast GEMM in ``dtype`` (bfloat16 / float16) on this CPU, from the
    private ``torch.ops.mkldnn._is_mkldnn_*_supported`` probes; False (fp32 GEMMs, always
    correct) when they are missing."""
    return not FORCE_FALLBACK and _mkldnn_probe(dtype)


@functools.lru_cache(maxsize=None)
def _mkldnn_probe(dtype: torch.dtype) -> bool:
    probe = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }.get(dtype)
    if probe is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False
