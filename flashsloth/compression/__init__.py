"""The peers' compression mechanisms as modes of the FlashSloth model.

Each mode is one small module with its plain PyTorch reference beside it; each keeps
``config.budget_per_view`` visual tokens per view (``config.token_budget``; default
FlashSloth's 81 per 27 x 27 view, what "sap" and "avgpool" give):

- ``visionzip`` (visionzip.py), on the tower's features with its selected layer's attention:
  dominant tokens by attention received (SigLIP has no CLS token: the mean over all
  queries) + contextual tokens merged by key similarity;
- ``fastv`` (fastv.py), inside the LLM: every visual token enters; after layer K (2) only
  those most attended by the last prompt token stay (prefill only; the KV cache shrinks);
- ``random`` (random.py), on the tower's features: a seeded uniform choice of patches;
- ``downsample`` (downsample.py), on the tower's features: the patch grid resized (bilinear,
  antialiased) to h x w = budget.

None has parameters: a FlashSloth checkpoint runs in every mode (its SAP, query-token and
EmbQ weights are not used), and training trains the projector (stage 1) or the projector
and the LLM (stage 2) around them.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .downsample import Downsample, downsample_reference, grid_shape
from .fastv import FastV, fastv_keep_reference, keep_positions, last_token_attention
from .random import RandomSelect, random_patch_indices, random_reference
from .visionzip import VisionZip, visionzip_reference

__all__ = ["Downsample", "FastV", "RandomSelect", "VisionZip", "build_pooling", "build_pruner",
           "downsample_reference", "fastv_keep_reference", "grid_shape", "keep_positions",
           "last_token_attention", "random_patch_indices", "random_reference",
           "visionzip_reference"]


def build_pooling(config) -> Optional[nn.Module]:
    """The module that turns a view's patch features into its visual tokens, for the modes
    that act on the tower's features ("visionzip", "random", "downsample"); else None."""
    k = config.budget_per_view
    if config.compression == "visionzip":
        return VisionZip(*config.visionzip_split)
    if config.compression == "random":
        return RandomSelect(k, views=config.num_views, seed=config.compression_seed)
    if config.compression == "downsample":
        return Downsample(k)
    return None


def build_pruner(config) -> Optional[FastV]:
    """FastV's pruning rule for "fastv" (visual tokens kept per image: budget x views)."""
    if config.compression != "fastv":
        return None
    return FastV(config.fastv_layer, config.num_views * config.budget_per_view)
