"""The registered ops ``flashsloth::query_patch_attention`` (+ ``_backward``) and the public function.

Naming chain: kernels (csrc/attention, fused_triton.py) -> host functions ``attn_fwd`` /
``attn_bwd`` (one pair per backend module; reference.py's are ``attn_reference_fwd`` / ``_bwd``)
-> registered ops ``flashsloth::query_patch_attention`` / ``..._backward`` -> public function
:func:`query_patch_attention` -> module ``EmbeddedQuery``.

The forward op returns (out, lse); lse (B, H, Lq) is what the backward recomputes the
probabilities from, and is not differentiable. The public function returns out only.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from typing import List, Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _checks
from .._dispatch import Dispatcher, cpu_reasons_for, reference_reasons, triton_reasons
from . import reference

Tensor = torch.Tensor

MAX_HEAD_DIM = 256

# backend name -> module holding its host functions attn_fwd / attn_bwd, imported on first use
# (a missing Triton or extension costs nothing until that backend is chosen).
_HOST_MODULES = {
    "cpu": "flashsloth_kernels.attention.fused_cpu",
    "triton": "flashsloth_kernels.attention.fused_triton",
    "cuda": "flashsloth_kernels.attention.fused_cuda",
}


@functools.lru_cache(maxsize=None)
def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _cuda_reasons(device: torch.device, dtype: torch.dtype, **facts) -> List[str]:
    # imported here: the CUDA loader is only needed once a CUDA problem asks
    from .. import _cuda_ext

    return _cuda_ext.cuda_reasons(device, dtype, **facts)


dispatcher = Dispatcher("query_patch_attention")
dispatcher.register("reference", reference_reasons)
dispatcher.register("cpu", cpu_reasons_for("flashsloth_kernels.attention._C"))
# Backends whose host module is in this installation; the others answer "not implemented".
if _module_exists(_HOST_MODULES["triton"]):
    dispatcher.register("triton", triton_reasons)
if _module_exists(_HOST_MODULES["cuda"]):
    dispatcher.register("cuda", _cuda_reasons)


_HOSTS = {"reference": (reference.attn_reference_fwd, reference.attn_reference_bwd)}


def _host(backend: str):
    """(attn_fwd, attn_bwd) of a backend, its module imported on first use."""
    fns = _HOSTS.get(backend)
    if fns is None:
        mod = importlib.import_module(_HOST_MODULES[backend])
        fns = _HOSTS[backend] = (mod.attn_fwd, mod.attn_bwd)
    return fns


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _degenerate(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """No work for a kernel: an empty batch / head / query axis, or no key at all."""
    return q.numel() == 0 or k.shape[2] == 0 or v.shape[3] == 0


def _forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
             backend: str) -> Tuple[Tensor, Tensor]:
    if _degenerate(q, k, v):
        B, H, Lq, _ = q.shape
        out = q.new_zeros(B, H, Lq, v.shape[3])
        lse = q.new_full((B, H, Lq), math.inf, dtype=_lse_dtype(q.dtype))
        return out, lse
    out, lse = _host(backend)[0](q, k, v, key_padding_mask, scale)
    # the fake kernel promises contiguous outputs (no-ops for the backends' own buffers)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("flashsloth::query_patch_attention", mutates_args=())
def _attn_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
             backend: str) -> Tuple[Tensor, Tensor]:
    return _forward(q, k, v, key_padding_mask, scale, backend)


@_attn_op.register_fake
def _(q, k, v, key_padding_mask, scale, backend):
    B, H, Lq, _ = q.shape
    return (q.new_empty(B, H, Lq, v.shape[3]),
            q.new_empty(B, H, Lq, dtype=_lse_dtype(q.dtype)))


@torch.library.custom_op("flashsloth::query_patch_attention_backward", mutates_args=())
def _attn_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 key_padding_mask: Optional[Tensor], scale: float, out: Tensor, lse: Tensor,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if _degenerate(q, k, v):
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    dq, dk, dv = _host(backend)[1](grad_out, q, k, v, key_padding_mask, scale, out, lse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attn_bwd_op.register_fake
def _(grad_out, q, k, v, key_padding_mask, scale, out, lse, backend):
    # contiguous, whatever the inputs' strides: what every backend returns
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None, None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attn_bwd_op(grad_out, q, k, v, key_padding_mask, ctx.scale, out, lse,
                              ctx.backend)
    return (dq if ctx.needs_input_grad[0] else None,
            dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None,
            None, None, None)


_attn_op.register_autograd(_backward, setup_context=_setup_context)


def attention_flops(B: int, H: int, Lq: int, Lk: int, Dk: int, Dv: int) -> int:
    """Forward FLOPs: q k^T (2 Lq Lk Dk) and p v (2 Lq Lk Dv) per (b, h); softmax not counted."""
    return 2 * B * H * Lq * Lk * (Dk + Dv)


def attention_backward_flops(B: int, H: int, Lq: int, Lk: int, Dk: int, Dv: int) -> int:
    """Backward FLOPs per (b, h): recomputed q k^T (2 Lq Lk Dk), dv = p^T dO (2 Lq Lk Dv),
    dp = dO v^T (2 Lq Lk Dv), dq = ds k and dk = ds^T q (2 Lq Lk Dk each)."""
    return 2 * B * H * Lq * Lk * (3 * Dk + 2 * Dv)


@register_flop_formula(torch.ops.flashsloth.query_patch_attention)
def _attn_flop_formula(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    B, H, Lq, Dk = q_shape
    return attention_flops(B, H, Lq, k_shape[2], Dk, v_shape[3])


@register_flop_formula(torch.ops.flashsloth.query_patch_attention_backward)
def _attn_bwd_flop_formula(grad_out_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    B, H, Lq, Dk = q_shape
    return attention_backward_flops(B, H, Lq, k_shape[2], Dk, v_shape[3])


def _check_scale(scale, Dk: int) -> float:
    return _checks.attention_scale("scale", scale, Dk)


def _check_inputs(q, k, v, key_padding_mask) -> None:
    """Raise TypeError / ValueError naming the argument, the shape got and the one expected.
    The messages are built only on failure: this runs on every call."""
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    _checks.same_dtype_device("q", q, k=k, v=v)
    B, H, Lq, Dk = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != Dk:
        _checks.shape("k", k, (B, H, None, Dk),
                      f"(B, H, Lk, Dk) with B, H, Dk from q {tuple(q.shape)}")
    Lk, Dv = k.shape[2], v.shape[3]
    if v.shape[0] != B or v.shape[1] != H or v.shape[2] != Lk:
        _checks.shape("v", v, (B, H, Lk, None), f"(B, H, Lk, Dv) with B, H from q "
                      f"{tuple(q.shape)} and Lk from k {tuple(k.shape)}")
    if not 1 <= Dk <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head size Dk in 1..{MAX_HEAD_DIM}, got {Dk} "
                         f"(q of shape {tuple(q.shape)})")
    if not 1 <= Dv <= MAX_HEAD_DIM:
        raise ValueError(f"v: expected a head size Dv in 1..{MAX_HEAD_DIM}, got {Dv} "
                         f"(v of shape {tuple(v.shape)})")
    if key_padding_mask is not None:
        _checks.tensor("key_padding_mask", key_padding_mask, floating=False)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = attend), "
                            f"got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected a tensor on q's device {q.device}, "
                             f"got {key_padding_mask.device}")
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != B \
                or key_padding_mask.shape[1] != Lk:
            _checks.shape("key_padding_mask", key_padding_mask, (B, Lk),
                          f"(B, Lk) with B from q {tuple(q.shape)} and Lk from k {tuple(k.shape)}")


def _unobserved_inference(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True for an eager call that needs no autograd and that no mode, transform or tensor
    subclass observes: the registered op would add nothing but its dispatch cost (~35 us a
    call on a 2-core CPU, as much as the whole B = 1 kernel's margin), so the public
    function calls the host function itself. Anything else goes through the op."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active())


def query_patch_attention(q: Tensor, k: Tensor, v: Tensor,
                          key_padding_mask: Optional[Tensor] = None,
                          scale: Optional[float] = None, *,
                          backend: Optional[str] = None) -> Tensor:
    """Multi-head attention of a few queries over many keys (FlashSloth's EmbQ steps).

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, j]) v[b, h, j], the softmax
    taken over the keys j with key_padding_mask[b, j] True, in fp32.

    Args:
        q: (B, H, Lq, Dk) queries.
        k: (B, H, Lk, Dk) keys.
        v: (B, H, Lk, Dv) values; Dv may differ from Dk. Head sizes Dk, Dv: 1..256.
        key_padding_mask: (B, Lk) bool, True = attend, or None (every key). A query whose keys
            are all masked gets a zero output (and zero gradients), never NaN.
        scale: logit scale, > 0; default Dk ** -0.5.
        backend: None (FLASHSLOTH_BACKEND, default "auto"), "auto", "reference", "cpu",
            "triton" or "cuda". A backend named explicitly that cannot run raises
            BackendUnavailableError saying why.

    Returns:
        (B, H, Lq, Dv) in q's dtype. Differentiable in q, k and v.

    Example:
        >>> q = torch.randn(2, 32, 9, 18)
        >>> k, v = torch.randn(2, 32, 729, 18), torch.randn(2, 32, 729, 36)
        >>> query_patch_attention(q, k, v).shape
        torch.Size([2, 32, 9, 36])
    """
    _check_inputs(q, k, v, key_padding_mask)
    scale = _check_scale(scale, q.shape[3])
    name = dispatcher.select(backend, q.device, q.dtype)
    if _unobserved_inference(q, k, v):
        return _forward(q, k, v, key_padding_mask, scale, name)[0]
    return _attn_op(q, k, v, key_padding_mask, scale, name)[0]
