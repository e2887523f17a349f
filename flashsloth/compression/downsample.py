"""``downsample``: the "simple downsampling" baseline, a smaller patch grid.

The g x g grid of patch features of every view is resized to an h x w grid with h * w =
``tokens`` (the most square factor pair: 81 -> 9 x 9, 90 -> 9 x 10) by bilinear interpolation
with antialiasing (a triangle filter as wide as the scale: every patch contributes; without
it, a 27 -> 9 bilinear resize would just pick every third patch). It acts on the tower's
features, so the tower's cost is that of the full image; nothing is learned.

Reference: :func:`downsample_reference`, the same filter written out as two weight matrices in
float64 (the formula of PIL / ``torch.nn.functional.interpolate(antialias=True)``).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def grid_shape(tokens: int) -> Tuple[int, int]:
    """(h, w), h <= w, h * w == tokens, the most square such pair."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens: expected an int >= 1, got {tokens!r}")
    h = math.isqrt(tokens)
    while tokens % h:
        h -= 1
    return h, tokens // h


def _square_grid(x: Tensor, name: str = "x") -> int:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected patch features (B, N, C), got {tuple(x.shape)}")
    g = math.isqrt(x.shape[1])
    if g * g != x.shape[1]:
        raise ValueError(f"{name}: expected a square patch grid, got N = {x.shape[1]} patches")
    return g


class Downsample(nn.Module):
    """(B, g * g, C) patch features -> (B, h * w, C) on an h x w grid (row-major), h * w =
    ``tokens``; bilinear with antialiasing, computed in float32 for low-precision inputs."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.out_hw = grid_shape(tokens)

    def forward(self, x: Tensor) -> Tensor:
        g = _square_grid(x)
        B, _, C = x.shape
        grid = x.transpose(1, 2).reshape(B, C, g, g)
        work = grid if grid.dtype in (torch.float32, torch.float64) else grid.float()
        out = F.interpolate(work, size=self.out_hw, mode="bilinear", align_corners=False,
                            antialias=True)
        return out.to(x.dtype).flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, grid={self.out_hw[0]}x{self.out_hw[1]}"


def resize_weights(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) float64 weights of the antialiased bilinear (triangle) filter along one
    axis: output i is centred at (i + 0.5) * s in input coordinates, s = n_in / n_out; the
    triangle is max(s, 1) wide on each side; each row sums to 1."""
    s = n_in / n_out
    support = max(s, 1.0)
    inv = 1.0 / s if s >= 1.0 else 1.0
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = (i + 0.5) * s
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        for j in range(lo, hi):
            w[i, j] = max(0.0, 1.0 - abs((j - centre + 0.5) * inv))
        w[i] /= w[i].sum()
    return w


@torch.no_grad()
def downsample_reference(x: Tensor, tokens: int) -> Tensor:
    """Plain float64 reference of :class:`Downsample`: out = Wh @ grid @ Ww^T per channel."""
    g = _square_grid(x)
    h, w = grid_shape(tokens)
    B, _, C = x.shape
    grid = x.double().reshape(B, g, g, C)
    wh, ww = resize_weights(g, h).to(x.device), resize_weights(g, w).to(x.device)
    out = torch.einsum("ir,brcx,jc->bijx", wh, grid, ww)
    return out.reshape(B, h * w, C)
