"""Phi-2 language model (microsoft/phi-2's architecture) with a static KV cache.

Submodule names follow the original checkpoints (and HF ``PhiForCausalLM``): embed_tokens,
layers.N.{self_attn.{q_proj,k_proj,v_proj,dense}, input_layernorm, mlp.fc1, mlp.fc2},
final_layernorm, lm_head.

Each block: h = h + attn(ln(h)) + mlp(ln(h)) (one LayerNorm feeding both branches). Rotary
embeddings act on the first ``rotary_dim`` = int(0.4 * head_dim) dims of every head (32 of 80).
Sequences may be left-padded: ``attention_mask`` marks real tokens and ``position_ids`` count
only real tokens, so a padded row computes what it would alone.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._sdpa import sdpa
from .config import TextConfig

Tensor = torch.Tensor


class KVCache:
    """Preallocated keys and values of every decoder layer for batched decoding.

    k[i], v[i]: (B, H, max_len, head_dim); ``length`` positions are filled. ``key_mask``
    (B, max_len) bool marks real (non-padding) keys; ``next_position`` (B,) is the rotary
    position of each row's next token.

    After a prefill that dropped tokens at the input of layer ``pruned_layer`` (FastV, see
    :class:`TokenPruning`), the layers from there on hold fewer keys: their k / v are
    (B, H, pruned_max_len, head_dim), filled up to ``pruned_length``, with their own
    ``pruned_key_mask``.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, *,
                 pruned_layer: Optional[int] = None, pruned_max_len: Optional[int] = None):
        self.max_len = max_len
        self.pruned_layer = pruned_layer
        caps = [max_len if pruned_layer is None or i < pruned_layer else pruned_max_len
                for i in range(num_layers)]
        self.k: List[Tensor] = [torch.zeros(batch, num_heads, cap, head_dim, dtype=dtype,
                                            device=device) for cap in caps]
        self.v: List[Tensor] = [torch.zeros_like(t) for t in self.k]
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.pruned_key_mask = (None if pruned_layer is None else
                                torch.zeros(batch, pruned_max_len, dtype=torch.bool,
                                            device=device))
        self.pruned_length = 0

    @classmethod
    def for_model(cls, lm: "PhiLanguageModel", batch: int, max_len: int,
                  pruned: Optional[tuple] = None) -> "KVCache":
        """``pruned``: (layer, max_len of the layers from ``layer`` on), for a FastV prefill."""
        cfg = lm.config
        w = lm.embed_tokens.weight
        layer, cap = pruned if pruned is not None else (None, None)
        return cls(cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len, cfg.head_dim,
                   w.dtype, w.device, pruned_layer=layer, pruned_max_len=cap)

    def is_pruned(self, layer: int) -> bool:
        return self.pruned_layer is not None and layer >= self.pruned_layer

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, H, T, hd) new keys/values at [length, length + T); return all keys so far."""
        length = self.pruned_length if self.is_pruned(layer) else self.length
        cap = self.k[layer].shape[2]
        start, end = length, length + k.shape[2]
        if end > cap:
            raise ValueError(f"KVCache: {length} cached + {k.shape[2]} new tokens exceed "
                             f"its max_len {cap} (layer {layer})")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, attention_mask: Tensor, pruned_attention_mask: Optional[Tensor] = None
                ) -> None:
        """After all layers ran on T new tokens: mark them (attention_mask (B, T) bool); the
        pruned layers' keys are marked by ``pruned_attention_mask`` (default: the same)."""
        T = attention_mask.shape[1]
        self.key_mask[:, self.length:self.length + T] = attention_mask
        self.length += T
        self.next_position = self.key_mask[:, :self.length].sum(1)
        if self.pruned_layer is not None:
            m = attention_mask if pruned_attention_mask is None else pruned_attention_mask
            n = m.shape[1]
            self.pruned_key_mask[:, self.pruned_length:self.pruned_length + n] = m
            self.pruned_length += n


class TokenPruning:
    """Tokens dropped once, at the input of decoder layer ``layer`` (from 0, >= 1), in a
    prefill or a full forward (FastV; see flashsloth/compression/fastv.py).

    ``select(prev_layer, h, cos, sin, attention_mask)`` gets decoder layer ``layer - 1`` and
    its input (h (B, T, D), rotary cos / sin (B, 1, T, r), attention_mask (B, T) bool) and
    returns keep (B, T') long: the positions that stay, in order, left-padded with -1.
    ``length`` is T', known before the run (it sizes the KV cache). Kept tokens keep their
    rotary positions. After the run ``keep`` holds what ``select`` returned.
    """

    def __init__(self, layer: int, length: int, select: Callable[..., Tensor]):
        self.layer, self.length, self.select = layer, length, select
        self.keep: Optional[Tensor] = None

    def apply(self, keep: Tensor, h: Tensor, cos: Tensor, sin: Tensor,
              attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(h, cos, sin, attention_mask) of the kept positions."""
        if keep.shape[1] != self.length:
            raise ValueError(f"TokenPruning: select kept {keep.shape[1]} positions, "
                             f"{self.length} were planned")
        self.keep = keep
        B = h.shape[0]
        idx = keep.clamp(min=0)
        h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
        rot = idx[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
        cos = cos.expand(B, -1, -1, -1).gather(2, rot)
        sin = sin.expand(B, -1, -1, -1).gather(2, rot)
        return h, cos, sin, attention_mask.gather(1, idx) & (keep >= 0)


def rotary_cos_sin(position_ids: Tensor, rotary_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, T, rotary_dim) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, T, hd); the rest pass through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def build_attention_mask(key_mask: Tensor, past: int, T: int) -> Tensor:
    """(B, 1, T, past + T) bool: causal, real keys only. A query may always see itself, so a
    padding row (no real key) gets a finite softmax instead of NaN; its output is unused."""
    S = past + T
    q_pos = torch.arange(past, S, device=key_mask.device)[:, None]
    k_pos = torch.arange(S, device=key_mask.device)[None, :]
    causal = k_pos <= q_pos
    allowed = causal[None] & key_mask[:, None, :S]
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


class PhiAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor],
                cache: Optional[KVCache], layer_idx: int) -> Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = apply_partial_rotary(q, cos, sin)
        k = apply_partial_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer_idx, k, v)
        dtype = q.dtype
        if dtype == torch.float16:
            # Phi-2's attention logits overflow fp16 (the original upcasts q and k to fp32)
            q, k, v = q.float(), k.float(), v.float()
        if mask is None:
            out = sdpa(q, k, v, is_causal=T > 1)
        else:
            out = sdpa(q, k, v, attn_mask=mask)
        return self.dense(out.to(dtype).transpose(1, 2).reshape(B, T, D))


class PhiMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))     # "gelu_new"


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg)
        self.mlp = PhiMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor],
                cache: Optional[KVCache], layer_idx: int) -> Tensor:
        x = self.input_layernorm(h)
        attn = self.self_attn(x, cos, sin, mask, cache, layer_idx)
        return h + self.resid_dropout(attn) + self.resid_dropout(self.mlp(x))


# Called at the input of every decoder layer: (layer index from 0, hidden (B, T, D)) -> hidden.
LayerHook = Callable[[int, Tensor], Tensor]


class PhiLanguageModel(nn.Module):
    """Phi-2: embed_tokens -> decoder layers -> final_layernorm -> lm_head (with bias).

    forward(inputs_embeds (B, T, D), attention_mask (B, T) bool or None, position_ids (B, T) or
    None, cache=None, layer_hook=None, logits_to_keep=None) -> logits (B, T', V) with T' = T or
    ``logits_to_keep`` (the last positions only: the prefill of generation needs one).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, inputs_embeds: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None,
                layer_hook: Optional[LayerHook] = None,
                logits_to_keep: Optional[int] = None,
                pruning: Optional[TokenPruning] = None) -> Tensor:
        h = self.hidden_states(inputs_embeds, attention_mask, position_ids, cache, layer_hook,
                               pruning)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    def hidden_states(self, inputs_embeds: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None,
                      layer_hook: Optional[LayerHook] = None,
                      pruning: Optional[TokenPruning] = None) -> Tensor:
        """Final-layernormed hidden states (B, T, D); same arguments as forward. With
        ``pruning``, (B, T', D) over the positions in ``pruning.keep``."""
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        attention_mask = attention_mask.to(torch.bool)
        if position_ids is None:
            start = cache.next_position[:, None] if cache is not None else 0
            position_ids = start + (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence: {past + T} positions exceed the context of "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        cfg = self.config
        cos, sin = rotary_cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta, inputs_embeds.dtype)
        padded = not bool(attention_mask.all())
        if cache is not None:
            key_mask = cache.key_mask.clone()
            key_mask[:, past:past + T] = attention_mask
            padded = padded or not bool(key_mask[:, :past].all())
        else:
            key_mask = attention_mask
        # Without padding SDPA needs no mask: is_causal for a prefill, nothing for one new token
        # (it sees every cached key). Its is_causal aligns top-left, so T > 1 after a past does.
        need_mask = padded or (past > 0 and T > 1)
        mask = build_attention_mask(key_mask, past, T) if need_mask else None
        if pruning is not None:
            if not 1 <= pruning.layer < len(self.layers) or past:
                raise ValueError(f"pruning: tokens are dropped in a prefill (no cached keys, "
                                 f"got {past}) at a layer in 1..{len(self.layers) - 1}, got "
                                 f"{pruning.layer}")
            if cache is not None and cache.pruned_layer != pruning.layer:
                raise ValueError(f"pruning: the cache was not built for pruning at layer "
                                 f"{pruning.layer} (KVCache.for_model(..., pruned=...))")
        kept_mask = None
        h = inputs_embeds
        h_prev = h
        for i, layer in enumerate(self.layers):
            if layer_hook is not None:
                h = layer_hook(i, h)
            if pruning is not None and i == pruning.layer:
                keep = pruning.select(self.layers[i - 1], h_prev, cos, sin, attention_mask)
                h, cos, sin, kept_mask = pruning.apply(keep, h, cos, sin, attention_mask)
                padded = not bool(kept_mask.all())
                mask = build_attention_mask(kept_mask, 0, h.shape[1]) if padded else None
            elif pruning is None and cache is not None and i == cache.pruned_layer:
                # decoding after a pruned prefill: from here on the layers hold fewer keys
                p_past = cache.pruned_length
                p_keys = cache.pruned_key_mask.clone()
                p_keys[:, p_past:p_past + T] = attention_mask
                padded = not bool(p_keys[:, :p_past + T].all())
                mask = (build_attention_mask(p_keys, p_past, T)
                        if padded or (p_past > 0 and T > 1) else None)
            h_prev = h
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(attention_mask, kept_mask)
        return self.final_layernorm(h)
