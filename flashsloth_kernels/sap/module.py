"""``SpatialAttentionPool``: the nn.Module users put in a model."""

from __future__ import annotations

from typing import Optional, Sequence, Union, cast

import torch
from torch import nn

from .. import _checks
from .op import fused, spatial_attention_pool


class SpatialAttentionPool(nn.Module):
    """Spatial attention pooling over a patch grid (FlashSloth's SAP).

    Scores every patch with ``mlp`` = Linear(dim, hidden_dim), ReLU, Dropout, Linear(hidden_dim, 1)
    and returns one softmax-weighted sum of the input features per window. The state_dict keys
    (mlp.0.weight, mlp.0.bias, mlp.3.weight, mlp.3.bias) are those of the original FlashSloth
    checkpoints (``model.pooling.mlp.*``), so their weights load with no renaming.

    Args:
        dim: channels C of the patch features.
        window: int or (kh, kw); 3 in FlashSloth (27 x 27 -> 81 tokens).
        hidden_dim: the scorer's hidden width Ch (default: dim).
        dropout: dropout on the hidden activations, active in training mode only.
        backend: default backend for this module's calls (None: FLASHSLOTH_BACKEND / auto).

    The arguments are validated here (TypeError / ValueError naming the argument), not at
    the first forward.

    Shapes: forward(x (B, N, C) or (B, H, W, C), grid_size=None) -> (B, G, C).

    Example:
        >>> pool = SpatialAttentionPool(1152)
        >>> pool(torch.randn(1, 729, 1152)).shape
        torch.Size([1, 81, 1152])
    """

    def __init__(self, dim: int, window: Union[int, Sequence[int]] = 3,
                 hidden_dim: Optional[int] = None, dropout: float = 0.1,
                 backend: Optional[str] = None):
        super().__init__()
        _checks.positive_int("dim", dim)
        hidden_dim = dim if hidden_dim is None else _checks.positive_int("hidden_dim", hidden_dim)
        _checks.int_pair("window", window)
        _checks.probability("dropout", dropout)
        if backend is not None:
            fused.requested(backend)  # a TypeError / ValueError naming backend
        self.window = window
        self.backend = backend
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1)
        )

    def forward(self, x: torch.Tensor, grid_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        fc1 = cast(nn.Linear, self.mlp[0])
        drop = cast(nn.Dropout, self.mlp[2])
        fc2 = cast(nn.Linear, self.mlp[3])
        return spatial_attention_pool(
            x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.window, grid_size,
            drop.p if self.training else 0.0, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"window={self.window}, backend={self.backend!r}"
