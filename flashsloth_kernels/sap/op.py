"""The registered op ``flashsloth::spatial_attention_pool`` and its public function.

Naming chain: kernels ``_sap_fwd_kernel`` / ``_sap_bwd_*`` (fused_triton.py, csrc/sap) ->
host functions ``sap_fwd`` / ``sap_bwd`` (one per backend module) -> registered ops
``flashsloth::spatial_attention_pool`` / ``flashsloth::spatial_attention_pool_backward``
-> public function :func:`spatial_attention_pool` -> module ``SpatialAttentionPool``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _checks
from .._op import FusedOp, compute_dtype
from . import reference

Tensor = torch.Tensor

fused = FusedOp("spatial_attention_pool", folder="sap", prefix="sap",
                reference_hosts=(reference.sap_reference_fwd, reference.sap_reference_bwd),
                plain_reference="flashsloth_kernels.sap.reference.sap_reference")
dispatcher = fused.dispatcher
# "auto" on CUDA: the extension's forward (cuBLAS GEMM with fp32 output + one fused epilogue)
# was faster than Triton's at every batch size of the H200 run of 2026-12-04
# (benchmarks/results/nvidia-h200/, bf16, 27x27 patches, C = 1152): forward 0.12 / 0.10 /
# 0.22 / 0.30 ms against 0.36 / 0.29 / 0.52 / 0.50 at B = 1 / 4 / 16 / 64, forward + backward
# 2.0-2.3 ms against 2.5 (its backward runs on Triton).
dispatcher.set_order("cuda", ("cuda", "triton", "reference"))


def _forward(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
             kh: int, kw: int, H: int, W: int, dropout_mask: Optional[Tensor],
             dropout_scale: float, backend: str) -> Tensor:
    if H == SQUARE:
        H = W = _square_side(x.shape[1])
    if x.shape[0] == 0:
        return x.new_empty(0, reference.num_windows(H, W, kh, kw), x.shape[2])
    name = fused.resolve(backend, x.device, x.dtype, needs_grad=_requires_grad(x, w1, b1, w2, b2))
    return fused.host(name)[0](x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale)


def _requires_grad(*tensors: Optional[Tensor]) -> bool:
    # what the public function resolved with (grad mode is off inside autograd's forward)
    return any(t is not None and t.requires_grad for t in tensors)


def _forward_fake(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale, backend):
    G: Union[int, torch.SymInt] = reference.num_windows(H, W, kh, kw)
    if H == SQUARE:
        G = torch.library.get_ctx().new_dynamic_size(min=1)
    return x.new_empty(x.shape[0], G, x.shape[2])


def _backward_impl(grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                   b2: Optional[Tensor], kh: int, kw: int, H: int, W: int,
                   dropout_mask: Optional[Tensor], dropout_scale: float, backend: str,
                   need_x: bool, need_w: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if H == SQUARE:
        H = W = _square_side(x.shape[1])
    if x.shape[0] == 0:
        dx, dw1, db1, dw2, db2 = _sap_bwd_fake(grad_out, x, w1, w2, need_x, need_w)
        return dx, dw1.zero_(), db1.zero_(), dw2.zero_(), db2.zero_()
    name = fused.resolve(backend, x.device, x.dtype, needs_grad=True)
    return fused.host(name)[1](grad_out, x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask,
                               dropout_scale, need_x, need_w)


def _sap_bwd_fake(grad_out, x, w1, w2, need_x, need_w):
    # Gradients are contiguous whatever the inputs' strides (as every backend returns them);
    # unneeded ones come back as distinct empty tensors (outputs may not alias).
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    if not need_w:
        return (dx,) + tuple(x.new_empty(0) for _ in range(4))
    return (dx, w1.new_empty(w1.shape), w1.new_empty(w1.shape[0]), w2.new_empty(w2.shape),
            w2.new_empty(1))


def _backward_fake(grad_out, x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale,
                   backend, need_x, need_w):
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
    grad_out = grad_out.contiguous()
    dx, dw1, db1, dw2, db2 = fused.call_backward(
        (grad_out, x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale, backend, need_x,
         need_w), (grad_out, x, w1, b1, w2, b2, dropout_mask), x.device)
    return (dx if need_x else None,
            dw1 if ctx.needs_input_grad[1] else None,
            db1 if b1 is not None and ctx.needs_input_grad[2] else None,
            dw2 if ctx.needs_input_grad[3] else None,
            db2 if b2 is not None and ctx.needs_input_grad[4] else None,
            None, None, None, None, None, None, None)


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


def _sap_flop_formula(x_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    return sap_flops(B, N, C, w1_shape[0], out_shape[1] if out_shape is not None else 0)


def _sap_bwd_flop_formula(g_shape, x_shape, w1_shape, b1_shape, w2_shape, b2_shape, kh, kw, H, W,
                          mask_shape, scale, backend, need_x, need_w, *args, **kwargs) -> int:
    B, N, C = x_shape
    return sap_backward_flops(B, N, C, w1_shape[0], need_x, need_w)


fused.define(_forward, _forward_fake, _backward_impl, _backward_fake, _setup_context, _backward,
             _sap_flop_formula, _sap_bwd_flop_formula)
_sap_op = fused.op
_sap_bwd_op = fused.backward_op


def _kernel_fwd_fake(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale,
                     lowp_gemm=False, images_per_chunk=0):
    return x.new_empty(x.shape[0], reference.num_windows(H, W, kh, kw), x.shape[2])


def _kernel_bwd_fake(grad_out, x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale,
                     need_x, need_w, lowp_gemm=False):
    return _sap_bwd_fake(grad_out, x, w1, w2, need_x, need_w)


# The compiled kernels (cpu and cuda backends): one schema, a kernel per dispatch key.
# lowp_gemm: CPU only (run the scorer GEMMs in 16 bits where oneDNN has a fast 16-bit GEMM);
# images_per_chunk: CUDA only (compute z for this many images at a time; 0 chooses).
fused.define_kernels(
    "spatial_attention_pool_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
    "int kh, int kw, int H, int W, Tensor? dropout_mask, float dropout_scale, "
    "bool lowp_gemm=False, int images_per_chunk=0) -> Tensor",
    "spatial_attention_pool_bwd(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, "
    "Tensor? b2, int kh, int kw, int H, int W, Tensor? dropout_mask, float dropout_scale, "
    "bool need_x, bool need_w, bool lowp_gemm=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _kernel_fwd_fake, _kernel_bwd_fake)


# H = W = SQUARE tells the op that x (B, N, C) is a square grid whose side it computes from N
# when it runs: torch.export of 3-D input with a dynamic N (sqrt(N) cannot be a guard of the
# exported program; the output's window count is then a size the program learns at run time).
SQUARE = 0


def _square_side(N: int) -> int:
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"x: N = {N} patches is not a perfect square; pass grid_size=(H, W) "
                         "with H * W == N")
    return side


def _grid(x: Tensor, grid_size) -> Tuple[int, int]:
    if x.dim() == 4:
        H, W = x.shape[1], x.shape[2]
        if grid_size is not None and _checks.int_pair("grid_size", grid_size) != (H, W):
            raise ValueError(f"grid_size: got {grid_size!r} but x of shape {tuple(x.shape)} "
                             f"is a ({H}, {W}) grid (grid_size may be omitted for 4-D x)")
        return H, W
    N = x.shape[1]
    if grid_size is None:
        if torch.compiler.is_exporting() and isinstance(N, torch.SymInt):
            return SQUARE, SQUARE  # a dynamic N: the op takes the square root when it runs
        if torch.compiler.is_compiling():
            # N may be symbolic (dynamic shapes): a square root dynamo can trace (its guards
            # recompile for a new N); math.isqrt would break the graph
            side = torch.sym_int(torch.sym_sqrt(N))
        else:
            side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"x: N = {N} patches (shape {tuple(x.shape)}) is not a perfect "
                             "square; "
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
        (B, ceil(H / kh) * ceil(W / kw), C) in x's dtype (inside torch.autocast: the autocast
        dtype, every input cast to it). Differentiable in reverse mode; forward-mode AD and
        torch.func.grad / jacrev raise (see flashsloth_kernels/_op.py).

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
    dtype = compute_dtype("x", x, w1=w1, b1=b1, w2=w2, b2=b2)
    fused.check_transforms(x, w1, b1, w2, b2)
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
        raise ValueError(f"w2: expected shape (1, {Ch}) or ({Ch},) (Ch from w1), "
                         f"got {tuple(w2.shape)}")
    if b2 is not None and b2.numel() != 1:
        raise ValueError(f"b2: expected shape (1,) or a 0-dim tensor, got {tuple(b2.shape)}")
    H, W = _grid(x, grid_size)
    kh, kw = _checks.int_pair("window", window)
    # A window larger than the grid is one partial window along that side (a 1x1 grid with
    # window 3 is one window of one patch): the same partition as a window of the grid's size,
    # which every backend also handles unclamped.
    if H != SQUARE:  # a square grid read from N at run time: the op handles it unclamped
        kh, kw = min(kh, H), min(kw, W)
    p = _checks.probability("dropout_p", dropout_p)
    requested = fused.requested(backend)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    name = fused.resolve(requested, x.device, dtype, needs_grad)  # raises before any work

    B = x.shape[0]
    x3 = x if x.dim() == 3 else x.reshape(B, x.shape[1] * x.shape[2], C)
    mask = None
    if p > 0.0:
        mask = torch.empty((B, x3.shape[1], Ch), dtype=torch.bool,
                           device=x.device).bernoulli_(1.0 - p)
    args = (x3, w1, b1, w2.reshape(Ch), None if b2 is None else b2.reshape(1),
            kh, kw, H, W, mask, 1.0 / (1.0 - p), requested)
    return fused.call(args, (x, w1, b1, w2, b2), x.device, name)
