"""Query-to-patch attention in plain PyTorch: the oracle and the fallback on any device.

Shapes (after the public function has checked them):
  q: (B, H, Lq, Dk), k: (B, H, Lk, Dk), v: (B, H, Lk, Dv); key_padding_mask: (B, Lk) bool,
  True = attend, or None; 0 < scale <= 1e4.

Math, per (b, h) and query i, over the attended keys j only:
  s_ij = (q_i . k_j) * scale  (the dot accumulated in fp32, then multiplied by scale),
  lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i),  out_i = sum_j p_ij v_j.

Numeric contract (docs/contract.md; every backend follows it):
* Logits, softmax and accumulation in fp32 (float64 for float64 inputs); out is rounded once
  to q's dtype, lse stays fp32 / float64.
* Masked-out keys never influence anything: whatever their k / v rows hold (NaN, inf,
  garbage), out, lse and dq are as if the rows did not exist, and their dk / dv are exactly 0.
* A query with no attended key gets out_i = 0, lse_i = +inf and zero gradients, never NaN.
* A non-finite score (NaN, +inf or -inf) at an attended key makes that row's out and lse NaN.
* NaN / inf in an attended v row makes the outputs of that (b, h) non-finite.
* Results are finite and accurate while every attended |s_ij| fits fp32 and
  Lk * max|v| < 3.4e38; beyond that an output may be non-finite, never finite and wrong.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 / fp16 / bf16 inputs (logits and softmax in fp32), float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _drop_masked(t: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """t (B, H, Lk, D) with the rows of masked-out keys set to 0 (so NaN / inf there cannot
    reach any output through 0 * NaN; their gradient is exactly 0)."""
    if key_padding_mask is None:
        return t
    return t.masked_fill(~key_padding_mask[:, None, :, None], 0)


def _logits(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], scale: float) -> Tensor:
    cd = compute_dtype(q.dtype)
    s = torch.matmul(q.to(cd), _drop_masked(k, key_padding_mask).to(cd).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    return s


def _bad_rows(s: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """(B, H, Lq, 1) bool: rows with a non-finite score at an attended key."""
    bad = ~torch.isfinite(s)
    if key_padding_mask is not None:
        bad = bad & key_padding_mask[:, None, None, :]
    return bad.any(-1, keepdim=True)


def query_patch_attention_reference(q: Tensor, k: Tensor, v: Tensor,
                                    key_padding_mask: Optional[Tensor] = None,
                                    scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Differentiable reference: returns (out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq)).

    Autograd through it gives the gradients the kernels must match (no NaN for all-masked
    rows: the shift is detached and the denominators are made safe before any division).
    See the module docstring for the numeric contract.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    cd = compute_dtype(q.dtype)
    s = _logits(q, k, key_padding_mask, scale)
    bad = _bad_rows(s.detach(), key_padding_mask)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no attended key
    e = torch.exp(s - m)                                        # masked keys: exp(-inf) = 0
    denom = e.sum(-1, keepdim=True)
    empty = denom == 0                                          # (NaN is not empty)
    safe = torch.where(empty, torch.ones_like(denom), denom)
    out = torch.matmul(e / safe, _drop_masked(v, key_padding_mask).to(cd))
    lse = torch.where(empty, torch.full_like(denom, math.inf), m + torch.log(safe))
    # a non-finite attended score: the row is NaN, explicitly (whatever exp / max made of it)
    nan = torch.full_like(denom, math.nan)
    out = torch.where(bad, nan, out)
    lse = torch.where(bad, nan, lse)
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
        if key_padding_mask is not None:  # a NaN row's p is NaN: keep masked keys at 0
            p = p.masked_fill(~key_padding_mask[:, None, None, :], 0)
        g = grad_out.to(cd)
        kc = _drop_masked(k, key_padding_mask).to(cd)
        vc = _drop_masked(v, key_padding_mask).to(cd)
        dv = torch.matmul(p.transpose(-1, -2), g)
        dp = torch.matmul(g, vc.transpose(-1, -2))
        delta = (g * out.to(cd)).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        if key_padding_mask is not None:  # (0 * NaN on a NaN row): masked keys get exactly 0
            ds = ds.masked_fill(~key_padding_mask[:, None, None, :], 0)
        dq = torch.matmul(ds, kc) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.to(cd)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
