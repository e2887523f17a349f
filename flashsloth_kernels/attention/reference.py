"""Query-to-patch attention in plain PyTorch: the oracle and the fallback on any device.

Shapes (after the public function has checked them):
  q: (B, H, Lq, Dk), k: (B, H, Lk, Dk), v: (B, H, Lk, Dv); key_padding_mask: (B, Lk) bool,
  True = attend, or None; scale > 0.

Math, per (b, h) and query i:
  s_ij = scale * q_i . k_j  over the attended keys j,  lse_i = log sum_j exp(s_ij),
  p_ij = exp(s_ij - lse_i),  out_i = sum_j p_ij v_j.
A query with no attended key gets out_i = 0 and lse_i = +inf (so exp(s - lse) = 0 in the
backward), never NaN. Logits, softmax and accumulation run in fp32 (float64 for float64
inputs); out is cast to q's dtype, lse stays fp32 / float64.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 / fp16 / bf16 inputs (logits and softmax in fp32), float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], scale: float) -> Tensor:
    cd = compute_dtype(q.dtype)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    return s


def query_patch_attention_reference(q: Tensor, k: Tensor, v: Tensor,
                                    key_padding_mask: Optional[Tensor] = None,
                                    scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Differentiable reference: returns (out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq)).

    Autograd through it gives the gradients the kernels must match (no NaN for all-masked
    rows: the shift is detached and the denominators are made safe before any division).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    cd = compute_dtype(q.dtype)
    s = _logits(q, k, key_padding_mask, scale)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no attended key
    e = torch.exp(s - m)                                        # masked keys: exp(-inf) = 0
    denom = e.sum(-1, keepdim=True)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(e / safe, v.to(cd))
    lse = torch.where(denom > 0, m + torch.log(safe), torch.full_like(denom, math.inf))
    return out.to(q.dtype), lse.squeeze(-1)


def attn_reference_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                       scale: float) -> Tuple[Tensor, Tensor]:
    """Host function of the reference backend's forward: (out, lse)."""
    with torch.no_grad():
        return query_patch_attention_reference(q, k, v, key_padding_mask, scale)


def attn_reference_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       key_padding_mask: Optional[Tensor], scale: float, out: Tensor,
                       lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Closed-form backward from the saved lse (the math every kernel implements).

    p = exp(s - lse) (0 on masked keys and on rows with lse = +inf), dv = p^T dO,
    dp = dO v^T, delta = rowsum(dO * out), ds = p * (dp - delta), dq = scale * ds k,
    dk = scale * ds^T q. Returns (dq, dk, dv) in the inputs' dtypes.
    """
    cd = compute_dtype(q.dtype)
    with torch.no_grad():
        s = _logits(q, k, key_padding_mask, scale)
        p = torch.exp(s - lse.to(cd).unsqueeze(-1))  # -inf - lse and s - inf both give 0
        g = grad_out.to(cd)
        dv = torch.matmul(p.transpose(-1, -2), g)
        dp = torch.matmul(g, v.to(cd).transpose(-1, -2))
        delta = (g * out.to(cd)).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq = torch.matmul(ds, k.to(cd)) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.to(cd)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
