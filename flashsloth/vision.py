"""SigLIP vision tower (the architecture of google/siglip-so400m-patch14-384), cut after the
selected layer.

Submodule names are those of HF ``SiglipVisionModel.vision_model`` (embeddings.patch_embedding,
embeddings.position_embedding, encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1,
layer_norm2, mlp.fc1, mlp.fc2}), so an original checkpoint's
``model.vision_tower.vision_tower.vision_model.*`` keys map by a prefix swap. The post-layernorm
and the pooling head are not built: FlashSloth uses the raw hidden state of the selected layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._sdpa import sdpa
from .config import VisionConfig


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """(B, N, D) -> (B, N, D); with ``return_attention`` also the attention probabilities
        (B, H, N, N) and the keys (B, H, N, head_dim), computed eagerly (what VisionZip reads;
        the same FLOPs as SDPA's)."""
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if not return_attention:
            out = sdpa(q, k, v)
            return self.out_proj(out.transpose(1, 2).reshape(B, N, D))
        probs = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5).float().softmax(-1)
        out = probs.to(v.dtype) @ v
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D)), probs, k


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            attn, probs, keys = self.self_attn(self.layer_norm1(x), return_attention=True)
            x = x + attn
            return x + self.mlp(self.layer_norm2(x)), probs, keys
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size,
                                         kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)                       # (B, N, D), row-major patches
        return x + self.position_embedding.weight


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_built_layers))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """With ``return_attention``: (features, the last layer's attention probabilities,
        its keys)."""
        for layer in self.layers[:-1]:
            x = layer(x)
        return self.layers[-1](x, return_attention=return_attention)


class SiglipVisionTower(nn.Module):
    """SigLIP patch features: pixel_values (B, 3, S, S) -> (B, (S / patch)^2, hidden).

    With the so400m sizes: (B, 3, 384, 384) -> (B, 729, 1152), the output of encoder layer 26
    of 27 (``select_layer=-2``), no CLS token, no post-layernorm.

    Example:
        >>> from flashsloth.config import VisionConfig
        >>> tower = SiglipVisionTower(VisionConfig(image_size=28, hidden_size=32,
        ...     intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
        >>> tower(torch.randn(1, 3, 28, 28)).shape
        torch.Size([1, 4, 32])
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, return_attention: bool = False):
        """Patch features (B, N, hidden); with ``return_attention`` also the selected layer's
        attention probabilities (B, heads, N, N) (float32) and keys (B, heads, N, head_dim)."""
        return self.encoder(self.embeddings(pixel_values), return_attention=return_attention)
