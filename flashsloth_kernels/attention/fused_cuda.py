"""Host functions of the ``cuda`` backend of query-to-patch attention (kernels in csrc/attention/).

Forward (flash-decoding on CUDA cores): grid (batch*head, query blocks, key splits); each
block keeps up to 16 query rows in shared memory, streams its key range in tiles of 64 keys
(fewer for large head dims), and runs an online softmax in base 2 with fp32 accumulation.
When batch*heads alone cannot fill the GPU (batch 1: 32 heads against 132 SMs), the keys are
split across blocks and a second kernel merges the partial results by their log-sum-exp.
Any head dims 1..256, Dk != Dv, key padding mask; rows with no attended key give out = 0
and lse = +inf.

Backward: the Triton backend's (``fused_triton.attn_bwd``: one program per key block, dk
and dv in registers, deterministic dq reduction). Without Triton the backend's reasons say so
for calls that need gradients (never a silent unfused fallback).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _cuda_ext
from .._ext import triton_error

Tensor = torch.Tensor


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
             *, num_splits: int = 0) -> Tuple[Tensor, Tensor]:
    """Forward on CUDA: returns out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32.

    q: (B, H, Lq, Dk), k: (B, H, Lk, Dk), v: (B, H, Lk, Dv), any strides (made contiguous
    here when they are not), one dtype of float32 / float16 / bfloat16; key_padding_mask:
    (B, Lk) bool, True = attend, or None; scale > 0. Inputs are trusted (op.py validates
    them); the C++ side repeats the key checks. num_splits (tests and tuning): 0 chooses;
    n > 0 cuts the keys into ranges of ceil(Lk / n) keys, at most 128.
    """
    return _cuda_ext.ops().query_patch_attention_fwd(q, k, v, key_padding_mask, float(scale),
                                                      int(num_splits))


def attn_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
             key_padding_mask: Optional[Tensor], scale: float, out: Tensor,
             lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward: the Triton backend's host function (raises RuntimeError without Triton).

    Returns (dq, dk, dv) in the inputs' dtypes, as reference.attn_reference_bwd does.
    """
    err = triton_error()
    if err is not None:
        raise RuntimeError(f"the cuda backend's backward runs the Triton kernels, and {err}")
    from . import fused_triton

    return fused_triton.attn_bwd(grad_out, q, k, v, key_padding_mask, scale, out, lse)
