"""``visionzip``: VisionZip (Yang et al., arXiv 2412.04467), dominant + contextual tokens.

From the selected layer of the vision tower (the layer whose output is the feature), per view:

1. **Dominant tokens**: the ``dominant`` patches that receive the most attention. VisionZip
   ranks patches by the attention the CLS token pays them; SigLIP has no CLS token, so this
   ranks by the *mean attention received* (averaged over heads and over all query patches),
   the choice VisionZip's code makes for towers without one. Kept as they are, in raster order.
2. **Contextual tokens**: the remaining R patches, compared by their keys (averaged over
   heads, L2-normalised): ``contextual`` targets are taken evenly spaced among them (every
   R // contextual-th), every other remaining patch is assigned to its most similar target,
   and each contextual token is the target's feature plus the mean of its assigned features
   (as VisionZip's code: target + mean, a target with nothing assigned stays as it is).

Output: (B, dominant + contextual, C), dominant tokens first. Nothing is learned; the only
counted FLOPs are the two merges' matmuls (similarities, assigned sums); the tower's last
layer computes its attention eagerly to expose the probabilities (the same FLOPs as SDPA).

Reference: :func:`visionzip_reference`, the same steps one view and one patch at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _check(features: Tensor, probs: Tensor, keys: Tensor, tokens: int) -> None:
    if features.dim() != 3:
        raise ValueError(f"features: expected (B, N, C), got {tuple(features.shape)}")
    B, N, _ = features.shape
    if probs.dim() != 4 or probs.shape[0] != B or tuple(probs.shape[2:]) != (N, N):
        raise ValueError(f"probs: expected attention probabilities (B, H, N, N) = "
                         f"({B}, H, {N}, {N}), got {tuple(probs.shape)}")
    if keys.dim() != 4 or keys.shape[0] != B or keys.shape[2] != N:
        raise ValueError(f"keys: expected (B, H, N, head_dim) with B = {B}, N = {N}, "
                         f"got {tuple(keys.shape)}")
    if tokens > N:
        raise ValueError(f"VisionZip keeps {tokens} tokens but a view has only {N} patches")


class VisionZip(nn.Module):
    """(features (B, N, C), probs (B, H, N, N), keys (B, H, N, hd)) -> (B, dominant +
    contextual, C). ``needs_attention``: the model passes the tower's selected-layer
    attention probabilities and keys."""

    needs_attention = True

    def __init__(self, dominant: int, contextual: int):
        super().__init__()
        if dominant < 1 or contextual < 0:
            raise ValueError(f"VisionZip: expected dominant >= 1 and contextual >= 0, got "
                             f"{dominant} and {contextual}")
        self.dominant, self.contextual = dominant, contextual

    def forward(self, features: Tensor, probs: Tensor, keys: Tensor) -> Tensor:
        D, Cn = self.dominant, self.contextual
        _check(features, probs, keys, D + Cn)
        B, N, _ = features.shape
        received = probs.float().mean(dim=(1, 2))                          # (B, N)
        top = received.topk(D, dim=1).indices
        is_dom = torch.zeros(B, N, dtype=torch.bool, device=features.device)
        is_dom.scatter_(1, top, True)
        # stable sort: the dominant patches first, each group in raster order
        order = torch.argsort((~is_dom).to(torch.int8), dim=1, stable=True)
        dom_idx, rest_idx = order[:, :D], order[:, D:]

        def take(t: Tensor, idx: Tensor) -> Tensor:
            return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

        dominant = take(features, dom_idx)
        if Cn == 0:
            return dominant
        R = N - D
        step = max(1, R // Cn)
        targets_at = range(0, step * Cn, step)                # positions among the R
        others_at = [p for p in range(R) if p % step or p >= step * Cn]
        tgt_pos = torch.tensor(targets_at, dtype=torch.long, device=features.device)
        oth_pos = torch.tensor(others_at, dtype=torch.long, device=features.device)
        rest = take(features, rest_idx)                                    # (B, R, C)
        metric = F.normalize(take(keys.mean(1), rest_idx), dim=-1)        # (B, R, hd)
        targets = rest[:, tgt_pos]
        contextual = targets
        if oth_pos.numel():
            sim = metric[:, oth_pos] @ metric[:, tgt_pos].transpose(1, 2)  # (B, R - Cn, Cn)
            assign = torch.zeros_like(sim, dtype=features.dtype).scatter_(
                2, sim.argmax(-1, keepdim=True), 1.0)                      # (B, R - Cn, Cn)
            counts = assign.sum(1).clamp(min=1)[..., None]                 # (B, Cn, 1)
            merged = (assign.transpose(1, 2) @ rest[:, oth_pos]) / counts  # (B, Cn, C)
            contextual = targets + merged
        return torch.cat([dominant, contextual], 1)

    def extra_repr(self) -> str:
        return f"dominant={self.dominant}, contextual={self.contextual}"


@torch.no_grad()
def visionzip_reference(features: Tensor, probs: Tensor, keys: Tensor, dominant: int,
                        contextual: int) -> Tensor:
    """The steps of :class:`VisionZip` in float64, one view and one patch at a time."""
    _check(features, probs, keys, dominant + contextual)
    out = []
    for b in range(features.shape[0]):
        x, p, k = features[b].double(), probs[b].double(), keys[b].double()
        N = x.shape[0]
        received = [float(p[:, :, j].mean()) for j in range(N)]
        ranked = sorted(range(N), key=lambda j: -received[j])
        dom = sorted(ranked[:dominant])
        rest = [j for j in range(N) if j not in set(dom)]
        tokens = [x[j] for j in dom]
        if contextual:
            step = max(1, len(rest) // contextual)
            targets = rest[::step][:contextual]
            others = [j for j in rest if j not in set(targets)]
            metric = {j: k[:, j].mean(0) / k[:, j].mean(0).norm() for j in rest}
            members = {t: [] for t in targets}
            for j in others:
                sims = [float(metric[j] @ metric[t]) for t in targets]
                members[targets[sims.index(max(sims))]].append(j)
            for t in targets:
                extra = (torch.stack([x[j] for j in members[t]]).mean(0) if members[t]
                         else torch.zeros_like(x[t]))
                tokens.append(x[t] + extra)
        out.append(torch.stack(tokens))
    return torch.stack(out)
