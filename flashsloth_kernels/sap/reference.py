"""Spatial attention pooling in plain, vectorised PyTorch: the oracle and the fallback.

Shapes (after the public function has normalised its arguments):
  x: (B, N, C) with N = H * W, row-major grid; w1: (Ch, C); b1: (Ch,) or None;
  w2: (Ch,); b2: (1,) or None; dropout_mask: (B, N, Ch) bool or None.

Math, per patch i:  z_i = W1 x_i + b1,  a_i = relu(z_i) * m_i * scale,  s_i = w2 . a_i + b2.
Per window g:       alpha = softmax(s over g's patches),  out_g = sum_i alpha_i x_i.
Windows are kh x kw, non-overlapping, row-major; edge windows hold only the patches
that exist, and a window larger than the grid gives partial windows (a 1x1 grid with
window 3 is one window of one patch).

Numeric contract (docs/contract.md; every backend follows it):
* Every intermediate (z, a, s, alpha, the weighted sum, all of the backward) is fp32 for
  fp16 / bf16 / fp32 inputs (float64 for float64); the output is rounded once to x's dtype.
  No 16-bit intermediate: a float16 z would overflow at 65504.
* NaN and inf propagate as IEEE arithmetic of this formula does: relu(NaN) = NaN, and b2 is
  added even though it cancels in the softmax. NaN / inf in one patch of x poisons exactly
  that patch's window (its score and its weighted sum); NaN in w1 / b1 / w2 / b2 makes every
  output NaN.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_windows(H: int, W: int, kh: int, kw: int) -> int:
    return math.ceil(H / kh) * math.ceil(W / kw)


def _to_windows(t: Tensor, H: int, W: int, kh: int, kw: int, fill: float) -> Tensor:
    """(B, H*W, *rest) -> (B, G, kh*kw, *rest), padding partial windows with ``fill``."""
    B, rest = t.shape[0], t.shape[2:]
    Gh, Gw = math.ceil(H / kh), math.ceil(W / kw)
    t = t.reshape(B, H, W, math.prod(rest))  # (not -1: B may be 0)
    t = F.pad(t, (0, 0, 0, Gw * kw - W, 0, Gh * kh - H), value=fill)
    t = t.reshape(B, Gh, kh, Gw, kw, math.prod(rest)).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(B, Gh * Gw, kh * kw, *rest)


def _scores(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            dropout_mask: Optional[Tensor], dropout_scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (z, a, s): pre-activation (B, N, Ch), activation after dropout, scores (B, N)."""
    z = F.linear(x, w1, b1)
    a = torch.relu(z)
    if dropout_mask is not None:
        a = a * dropout_mask * dropout_scale
    s = a @ w2
    if b2 is not None:
        s = s + b2
    return z, a, s


def sap_reference(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                  kh: int, kw: int, H: int, W: int, dropout_mask: Optional[Tensor] = None,
                  dropout_scale: float = 1.0) -> Tensor:
    """Differentiable reference forward: (B, N, C) -> (B, G, C). Autograd gives its backward."""
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    _, _, s = _scores(xc, w1.to(cd), None if b1 is None else b1.to(cd), w2.to(cd),
                      None if b2 is None else b2.to(cd), dropout_mask, dropout_scale)
    alpha = torch.softmax(_to_windows(s.unsqueeze(-1), H, W, kh, kw, -math.inf).squeeze(-1), dim=-1)
    xw = _to_windows(xc, H, W, kh, kw, 0.0)
    out = torch.einsum("bgk,bgkc->bgc", alpha, xw)
    return out.to(x.dtype)


def sap_reference_fwd(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale) -> Tensor:
    """Host function of the reference backend's forward."""
    return sap_reference(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask, dropout_scale)


def sap_reference_bwd(grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                      b2: Optional[Tensor], kh: int, kw: int, H: int, W: int,
                      dropout_mask: Optional[Tensor], dropout_scale: float, need_x: bool = True,
                      need_w: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Closed-form backward, recomputing the hidden activations (the math every kernel uses).

    With dalpha_i = g_w . x_i (g_w: grad of i's window), the softmax backward is
    ds_i = alpha_i (dalpha_i - sum_{j in w} alpha_j dalpha_j); then
    dx_i = alpha_i g_w + dz_i W1,  dz_i = ds_i w2 * m_i * scale * [z_i > 0],
    dW1 = dz^T x, db1 = sum dz, dw2 = sum ds_i a_i, db2 = sum ds.
    Returns (dx, dw1, db1, dw2, db2); dx is empty unless need_x, dw1/db1/dw2/db2 unless need_w.
    """
    cd = compute_dtype(x.dtype)
    B, N, C = x.shape
    xc, w1c, w2c, g = x.to(cd), w1.to(cd), w2.to(cd), grad_out.to(cd)
    z, a, s = _scores(xc, w1c, None if b1 is None else b1.to(cd), w2c,
                      None if b2 is None else b2.to(cd), dropout_mask, dropout_scale)
    G = num_windows(H, W, kh, kw)
    alpha_w = torch.softmax(_to_windows(s.unsqueeze(-1), H, W, kh, kw, -math.inf).squeeze(-1), -1)
    # window index of every patch, to map per-window tensors back to patches
    win = _patch_window_index(H, W, kh, kw, x.device)
    alpha = _from_windows(alpha_w, H, W, kh, kw)                      # (B, N)
    g_patch = g[:, win]                                               # (B, N, C)
    dalpha = (g_patch * xc).sum(-1)                                   # (B, N)
    inner = torch.zeros(B, G, dtype=cd, device=x.device).index_add_(1, win, alpha * dalpha)
    ds = alpha * (dalpha - inner[:, win])                             # (B, N)
    dz = ds.unsqueeze(-1) * w2c * (z > 0)
    if dropout_mask is not None:
        dz = dz * dropout_mask * dropout_scale
    if need_x:
        dx = (alpha.unsqueeze(-1) * g_patch + dz @ w1c).to(x.dtype)
    else:
        dx = x.new_empty(0)
    if need_w:
        dw1 = (dz.reshape(-1, dz.shape[-1]).t() @ xc.reshape(-1, C)).to(w1.dtype)
        db1 = dz.sum((0, 1)).to(w1.dtype)
        dw2 = (ds.unsqueeze(-1) * a).sum((0, 1)).to(w2.dtype)
        db2 = ds.sum().reshape(1).to(w2.dtype)
    else:  # distinct empties: a custom op's outputs may not alias one another
        dw1, db1, dw2, db2 = (x.new_empty(0) for _ in range(4))
    return dx, dw1, db1, dw2, db2


def _patch_window_index(H: int, W: int, kh: int, kw: int, device) -> Tensor:
    """(N,) long: the row-major window index of every patch."""
    rows = torch.arange(H, device=device) // kh
    cols = torch.arange(W, device=device) // kw
    return (rows[:, None] * math.ceil(W / kw) + cols[None, :]).reshape(-1)


def _from_windows(t: Tensor, H: int, W: int, kh: int, kw: int) -> Tensor:
    """Inverse of _to_windows for (B, G, kh*kw) -> (B, H*W), dropping the padding."""
    B = t.shape[0]
    Gh, Gw = math.ceil(H / kh), math.ceil(W / kw)
    t = t.reshape(B, Gh, Gw, kh, kw).permute(0, 1, 3, 2, 4).reshape(B, Gh * kh, Gw * kw)
    return t[:, :H, :W].reshape(B, H * W)
