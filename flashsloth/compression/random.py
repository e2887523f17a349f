"""``random``: a seeded uniform choice of patches, the floor every method must beat.

Each view keeps ``tokens`` of its N patches, chosen uniformly at random (the first ``tokens``
of a random permutation), in raster order. The choice is drawn once per call from a
generator seeded with ``config.compression_seed``: one draw per view position (global view,
tile 1, ...), shared by every image of the batch, so a sample's tokens do not depend on the
batch it is in or on the call, and another seed gives another draw. Nothing is learned.

Reference: :func:`random_reference`, a loop over rows picking the same indices one by one.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def random_patch_indices(views: int, num_patches: int, tokens: int, seed: int) -> Tensor:
    """(views, tokens) long, sorted: the patches each view position keeps (on the CPU)."""
    if not 1 <= tokens <= num_patches:
        raise ValueError(f"tokens: expected 1..{num_patches} (the patches of a view), "
                         f"got {tokens}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.rand(views, num_patches, generator=g).argsort(dim=1)
    return order[:, :tokens].sort(dim=1).values


class RandomSelect(nn.Module):
    """(B * views, N, C) patch features (views of one image consecutive) -> (B * views,
    tokens, C): the seeded random patches of each view position."""

    def __init__(self, tokens: int, views: int = 1, seed: int = 0):
        super().__init__()
        self.tokens, self.views, self.seed = tokens, views, seed

    def indices(self, rows: int, num_patches: int) -> Tensor:
        """(rows, tokens) indices of the patches kept in each row (row r is view r % views)."""
        if rows % self.views:
            raise ValueError(f"x: {rows} rows are not a whole number of images of "
                             f"{self.views} views")
        idx = random_patch_indices(self.views, num_patches, self.tokens, self.seed)
        return idx.repeat(rows // self.views, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"x: expected patch features (B, N, C), got {tuple(x.shape)}")
        idx = self.indices(x.shape[0], x.shape[1]).to(x.device)
        return x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, views={self.views}, seed={self.seed}"


@torch.no_grad()
def random_reference(x: Tensor, indices: Tensor) -> Tensor:
    """Row by row, patch by patch: out[r, i] = x[r, indices[r, i]]."""
    rows = []
    for r in range(x.shape[0]):
        rows.append(torch.stack([x[r, int(j)] for j in indices[r]]))
    return torch.stack(rows)
