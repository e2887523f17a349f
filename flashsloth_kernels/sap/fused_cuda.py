"""Host functions of the ``cuda`` backend of spatial attention pooling (kernels in csrc/sap/).

Forward: the scorer GEMM z = x @ w1^T in cuBLAS (at::mm, in x's dtype), then one fused CUDA
kernel per (image, window) for everything else: bias, ReLU, dropout mask, the dot with w2 and
b2, the window softmax with its max subtracted, and the attention-weighted sum of the
window's rows of x, accumulated in fp32. Two launches in all; the only intermediate is z.

Backward: the Triton backend's (``fused_triton.sap_bwd``: recompute GEMM, fused window
softmax backward and dz kernels, cuBLAS for dW1 and dx), which already fuses everything a
CUDA kernel would, so a separate CUDA backward would only duplicate it. Without Triton the
backend's reasons say so for calls that need gradients (never a silent unfused fallback).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _cuda_ext
from .._ext import triton_error

Tensor = torch.Tensor


def sap_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            kh: int, kw: int, H: int, W: int, dropout_mask: Optional[Tensor],
            dropout_scale: float, *, images_per_chunk: int = 0) -> Tensor:
    """Forward on CUDA: x (B, N = H*W, C) -> (B, ceil(H/kh) * ceil(W/kw), C) in x's dtype.

    w1: (Ch, C); b1: (Ch,) or None; w2: (Ch,); b2: (1,) or None; dropout_mask: (B, N, Ch) bool
    or None (kept units scaled by dropout_scale). Same semantics as
    reference.sap_reference_fwd. Inputs are trusted (op.py validates them); the C++ side
    repeats the key checks. images_per_chunk (tuning): compute z for this many images at a
    time into one reused buffer; 0 bounds z to 256 MiB.
    """
    return _cuda_ext.ops().spatial_attention_pool_fwd(
        x, w1, b1, w2, b2, int(kh), int(kw), int(H), int(W), dropout_mask, float(dropout_scale),
        False, int(images_per_chunk))


def sap_bwd(grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], kh: int, kw: int, H: int, W: int,
            dropout_mask: Optional[Tensor], dropout_scale: float, need_x: bool = True,
            need_w: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: the Triton backend's host function (raises RuntimeError without Triton).

    Returns (dx, dw1, db1, dw2, db2) as reference.sap_reference_bwd does.
    """
    err = triton_error()
    if err is not None:
        raise RuntimeError(f"the cuda backend's backward runs the Triton kernels, and {err}")
    from . import fused_triton

    return fused_triton.sap_bwd(grad_out, x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask,
                                dropout_scale,
               need_x, need_w)
