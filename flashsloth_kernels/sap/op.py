"""The registered op ``flashsloth::spatial_attention_pool`` and its public function.

Naming chain: kernels ``_sap_fwd_kernel`` / ``_sap_bwd_*`` (fused_triton.py, csrc/sap) ->
host functions ``sap_fwd`` / ``sap_bwd`` (one per backend module) -> registered ops
``flashsloth::spatial_attention_pool`` / ``flashsloth::spatial_attention_pool_backward``
-> public function :func:`spatial_attention_pool` -> module ``SpatialAttentionPool``.
"""

from __future__ import annotations

import importlib
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _checks
from .._cuda_ext import cuda_reasons
from .._dispatch import Dispatcher, cpu_reasons_for, reference_reasons, triton_reasons
from . import reference

Tensor = torch.Tensor

dispatcher = Dispatcher("spatial_attention_pool")
dispatcher.register("reference", reference_reasons)
dispatcher.register("cpu", cpu_reasons_for("flashsloth_kernels.sap._C"))
dispatcher.register("triton", triton_reasons)
dispatcher.register("cuda", cuda_reasons)

# backend name -> module holding its host functions sap_fwd / sap_bwd (imported lazily,
# so a missing Triton or extension costs nothing until that backend is chosen)
_HOST_MODULES = {
    "cpu": "flashsloth_kernels.sap.fused_cpu",
    "triton": "flashsloth_kernels.sap.fused_triton",
    "cuda": "flashsloth_kernels.sap.fused_cuda",
}


def _host(backend: str):
    if backend == "reference":
        return reference.sap_reference_fwd, reference.sap_reference_bwd
    mod = importlib.import_module(_HOST_MODULES[backend])
    return mod.sap_fwd, mod.sap_bwd


@torch.library.custom_op("flashsloth::spatial_attention_pool", mutates_args=())
def _sap_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            kh: int, kw: int, H: int, W: int, dropout_mask: Optional[Tensor],
            dropout_scale: float, backend: str) -> Tensor:
    if x.shape[0] == 0:
        return x.new_empty(0, reference.num_windows(H, W, kh, kw), x.shape[2])
    fwd, _ = _host(backend)
    return fwd(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale)


@_sap_op.register_fake
def _(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale, backend):
    return x.new_empty(x.shape[0], reference.num_windows(H, W, kh, kw), x.shape[2])


@torch.library.custom_op("flashsloth::spatial_attention_pool_backward", mutates_args=())
def _sap_bwd_op(grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor], kh: int, kw: int, H: int, W: int,
                dropout_mask: Optional[Tensor], dropout_scale: float, backend: str,
                need_x: bool, need_w: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if x.shape[0] == 0:
        dx, dw1, db1, dw2, db2 = _sap_bwd_fake(grad_out, x, w1, w2, need_x, need_w)
        return dx, dw1.zero_(), db1.zero_(), dw2.zero_(), db2.zero_()
    _, bwd = _host(backend)
    return bwd(grad_out, x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale,
               need_x, need_w)


def _sap_bwd_fake(grad_out, x, w1, w2, need_x, need_w):
    # Gradients are contiguous whatever the inputs' strides (as every backend returns them);
    # unneeded ones come back as distinct empty tensors (outputs may not alias).
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    if not need_w:
        return (dx,) + tuple(x.new_empty(0) for _ in range(4))
    return dx, w1.new_empty(w1.shape), w1.new_empty(w1.shape[0]), w2.new_empty(w2.shape), w2.new_empty(1)


@_sap_bwd_op.register_fake
def _(grad_out, x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale, backend,
      need_x, need_w):
    return _sap_bwd_fake(grad_out, x, w1, w2, need_x, need_w)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, dropout_mask)
    ctx.meta = (kh, kw, H, W, dropout_scale, backend)


def _backward(ctx, grad_out):
    x, w1, b1, w2, b2, dropout_mask = ctx.saved_tensors
    kh, kw, H, W, dropout_scale, backend = ctx.meta
    need_x = ctx.needs_input_grad[0]
    need_w = any(ctx.needs_input_grad[1:5])
    if not (need_x or need_w):
        return (None,) * 12
    dx, dw1, db1, dw2, db2 = _sap_bwd_op(grad_out.contiguous(), x, w1, b1, w2, b2, kh, kw, H, W,
                                         dropout_mask, dropout_scale, backend, need_x, need_w)
    return (dx if need_x else None,
            dw1 if ctx.needs_input_grad[1] else None,
            db1 if b1 is not None and ctx.needs_input_grad[2] else None,
            dw2 if ctx.needs_input_grad[3] else None,
            db2 if b2 is not None and ctx.needs_input_grad[4] else None,
            None, None, None, None, None, None, None)


_sap_op.register_autograd(_backward, setup_context=_setup_context)


def sap_flops(B: int, N: int, C: int, Ch: int, G: int) -> int:
    """Forward FLOPs: scorer GEMM 2BNCCh, score dot 2BNCh, weighted sum 2BNC (softmax ignored)."""
    return 2 * B * N * C * Ch + 2 * B * N * Ch + 2 * B * N * C


def sap_backward_flops(B: int, N: int, C: int, Ch: int, need_x: bool, need_w: bool) -> int:
    """Backward FLOPs: recompute GEMM + scores, dalpha, then dW1 / dw2 and dx GEMMs as needed."""
    flops = 2 * B * N * C * Ch + 2 * B * N * Ch + 2 * B * N * C
    if need_w:
        flops += 2 * B * N * C * Ch + 2 * B * N * Ch
    if need_x:
        flops += 2 * B * N * C * Ch + 2 * B * N * C
    return flops


@register_flop_formula(torch.ops.flashsloth.spatial_attention_pool)
def _sap_flop_formula(x_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    return sap_flops(B, N, C, w1_shape[0], out_shape[1] if out_shape is not None else 0)


@register_flop_formula(torch.ops.flashsloth.spatial_attention_pool_backward)
def _sap_bwd_flop_formula(g_shape, x_shape, w1_shape, b1_shape, w2_shape, b2_shape, kh, kw, H, W,
                          mask_shape, scale, backend, need_x, need_w, *args, **kwargs) -> int:
    B, N, C = x_shape
    return sap_backward_flops(B, N, C, w1_shape[0], need_x, need_w)


def _grid(x: Tensor, grid_size) -> Tuple[int, int]:
    if x.dim() == 4:
        H, W = x.shape[1], x.shape[2]
        if grid_size is not None and _checks.int_pair("grid_size", grid_size) != (H, W):
            raise ValueError(f"grid_size: got {grid_size!r} but x of shape {tuple(x.shape)} "
                             f"is a ({H}, {W}) grid (grid_size may be omitted for 4-D x)")
        return H, W
    N = x.shape[1]
    if grid_size is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"x: N = {N} patches (shape {tuple(x.shape)}) is not a perfect square; "
                             "pass grid_size=(H, W) with H * W == N")
        return side, side
    H, W = _checks.int_pair("grid_size", grid_size)
    if H * W != N:
        raise ValueError(f"grid_size: H * W = {H} * {W} = {H * W} must equal N = {N} "
                         f"(x of shape {tuple(x.shape)})")
    return H, W


def spatial_attention_pool(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                           b2: Optional[Tensor], window: Union[int, Sequence[int]] = 3,
                           grid_size: Optional[Sequence[int]] = None, dropout_p: float = 0.0, *,
                           backend: Optional[str] = None) -> Tensor:
    """FlashSloth's spatial attention pooling: one attention-weighted token per window.

    Args:
        x: patch features, (B, N, C) with N = H * W in row-major order, or (B, H, W, C).
        w1: (Ch, C) first scorer Linear's weight; b1: (Ch,) or None.
        w2: (1, Ch) or (Ch,) second scorer Linear's weight; b2: (1,), 0-dim or None.
        window: int or (kh, kw): non-overlapping windows, row-major; edge windows are partial
            when the grid is not a multiple of the window, and a window larger than the grid
            gives partial windows (a 1x1 grid with window 3: one window of one patch).
        grid_size: (H, W) for 3-D x; None means a square grid (N must be a perfect square).
        dropout_p: dropout on the scorer's hidden activations, applied when > 0 (the backward
            reuses the same mask). Modules pass their p only in training mode.
        backend: None (FLASHSLOTH_BACKEND, default "auto"), "auto", "reference", "cpu",
            "triton" or "cuda". A backend named explicitly that cannot run raises
            BackendUnavailableError saying why.

    Returns:
        (B, ceil(H / kh) * ceil(W / kw), C) in x's dtype.

    Example:
        >>> x = torch.randn(2, 729, 1152)
        >>> pool = SpatialAttentionPool(1152)
        >>> pool(x).shape
        torch.Size([2, 81, 1152])
    """
    _checks.tensor("x", x, ndim=(3, 4))
    _checks.tensor("w1", w1, ndim=2)
    _checks.tensor("b1", b1, ndim=1, optional=True)
    _checks.tensor("w2", w2, ndim=(1, 2))
    _checks.tensor("b2", b2, ndim=(0, 1), optional=True)
    _checks.same_dtype_device("x", x, w1=w1, b1=b1, w2=w2, b2=b2)
    C = x.shape[-1]
    Ch = w1.shape[0]
    if C < 1 or Ch < 1:
        raise ValueError(f"x / w1: channel sizes must be >= 1, got C = {C}, Ch = {Ch}")
    if w1.shape[1] != C:
        raise ValueError(f"w1: expected shape (Ch, C) = (*, {C}) to match x's C = {C}, "
                         f"got {tuple(w1.shape)}")
    if b1 is not None:
        _checks.shape("b1", b1, (Ch,), f"(Ch from w1 of shape {tuple(w1.shape)})")
    if w2.shape not in ((1, Ch), (Ch,)):
        raise ValueError(f"w2: expected shape (1, {Ch}) or ({Ch},) (Ch from w1), got {tuple(w2.shape)}")
    if b2 is not None and b2.numel() != 1:
        raise ValueError(f"b2: expected shape (1,) or a 0-dim tensor, got {tuple(b2.shape)}")
    H, W = _grid(x, grid_size)
    kh, kw = _checks.int_pair("window", window)
    # A window larger than the grid is one partial window along that side (a 1x1 grid with
    # window 3 is one window of one patch): the same partition as a window of the grid's size,
    # which every backend also handles unclamped.
    kh, kw = min(kh, H), min(kw, W)
    p = _checks.probability("dropout_p", dropout_p)
    name = dispatcher.select(backend, x.device, x.dtype)

    B = x.shape[0]
    x3 = x.reshape(B, H * W, C)
    mask = None
    if p > 0.0:
        mask = torch.empty((B, H * W, Ch), dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
    return _sap_op(x3, w1, b1, w2.reshape(Ch), None if b2 is None else b2.reshape(1),
                   kh, kw, H, W, mask, 1.0 / (1.0 - p), name)
