"""``fastv``: FastV (Chen et al., arXiv 2403.06764), visual tokens pruned inside the LLM.

All visual tokens (729 per view) enter the language model. The first K decoder layers
(``config.fastv_layer``, default 2) see all of them; at the input of layer K + 1 only the
``tokens`` visual tokens most attended by the last prompt token in layer K (its attention
row, averaged over heads) stay, with their original positions (rotary positions are not
renumbered), as FastV's code. Text tokens always stay. The later layers run on the shorter
sequence and cache keys / values only for it, so the KV cache shrinks by
(num_layers - K) / num_layers of the dropped tokens' share.

Pruning happens once, in a prefill (or a full forward); cached decoding never prunes again.
The query of the ranking is the last token of the prompt: the last position of a prefill, and
in a forward with labels the position before the first labelled token (so a training step's
choice cannot see the answer). A forward without labels ranks by its last position, so
``generate(use_cache=False)`` re-ranks at every step, as FastV's code without a cache.

The ranking needs layer K's attention probabilities for one query, which SDPA does not return:
:func:`last_token_attention` recomputes that row from layer K's input (its key projection and
the one query's projection, counted: ~2 L D^2 FLOPs, one twelfth of a layer).

Reference: :func:`fastv_keep_reference`, the full eager attention matrix of layer K and a loop
over rows picking the kept positions.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from ..language import TokenPruning, apply_partial_rotary

Tensor = torch.Tensor


def last_token_attention(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor,
                         attention_mask: Tensor, query_pos: Tensor) -> Tensor:
    """(B, T) float32: the attention probabilities of position ``query_pos[b]`` over the keys of
    decoder ``layer`` (a PhiDecoderLayer) whose input is ``h`` (B, T, D), averaged over heads.
    Keys after the query and padding keys (``attention_mask`` False) get 0."""
    attn = layer.self_attn
    B, T, _ = h.shape
    H, hd = attn.num_heads, attn.head_dim
    x = layer.input_layernorm(h)
    rows = torch.arange(B, device=h.device)
    cos, sin = cos.expand(B, -1, -1, -1), sin.expand(B, -1, -1, -1)
    k = apply_partial_rotary(attn.k_proj(x).view(B, T, H, hd).transpose(1, 2), cos, sin)
    q = attn.q_proj(x[rows, query_pos]).view(B, H, 1, hd)
    q = apply_partial_rotary(q, cos[rows, :, query_pos][:, :, None],
                             sin[rows, :, query_pos][:, :, None])
    logits = (q.float() @ k.float().transpose(-1, -2))[:, :, 0] / math.sqrt(hd)   # (B, H, T)
    allowed = attention_mask & (torch.arange(T, device=h.device)[None] <= query_pos[:, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(-1).mean(1)


def kept_length(visual: Tensor, attention_mask: Tensor, tokens: int) -> int:
    """T' of the pruned sequence: the most positions any row keeps."""
    real = attention_mask.sum(1)
    vis = (visual & attention_mask).sum(1)
    return int((real - vis + vis.clamp(max=tokens)).max()) if real.numel() else 0


def keep_positions(scores: Tensor, visual: Tensor, attention_mask: Tensor,
                   tokens: int) -> Tensor:
    """(B, T') long: per row the real text positions and its ``tokens`` best-scored visual
    positions, in order, left-padded with -1."""
    T = scores.shape[1]
    vis = visual & attention_mask
    ranked = scores.float().masked_fill(~vis, float("-inf"))
    top = ranked.topk(min(tokens, T), dim=1).indices
    chosen = torch.zeros_like(vis).scatter_(1, top, True) & vis
    keep = attention_mask & (~visual | chosen)
    counts = keep.sum(1)
    Tp = int(counts.max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, T - Tp:]
    pad = torch.arange(Tp, device=scores.device)[None] < (Tp - counts)[:, None]
    return order.masked_fill(pad, -1)


class FastV(nn.Module):
    """FastV's pruning rule for one model: ``layer`` = K (the layers that see every visual
    token) and ``tokens`` = visual tokens kept per image. No parameters."""

    def __init__(self, layer: int, tokens: int):
        super().__init__()
        self.layer, self.tokens = layer, tokens

    def plan(self, visual: Tensor, attention_mask: Tensor,
             query_pos: Optional[Tensor] = None) -> TokenPruning:
        """The pruning of one call: ``visual`` (B, T) bool marks the visual positions,
        ``query_pos`` (B,) the ranking query of each row (default: the last position)."""
        B, T = visual.shape
        if query_pos is None:
            query_pos = torch.full((B,), T - 1, dtype=torch.long, device=visual.device)
        attention_mask = attention_mask.bool()

        def select(prev_layer, h, cos, sin, mask):
            scores = last_token_attention(prev_layer, h, cos, sin, mask, query_pos)
            return keep_positions(scores, visual, mask, self.tokens)

        return TokenPruning(self.layer, kept_length(visual, attention_mask, self.tokens), select)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, tokens={self.tokens}"


@torch.no_grad()
def fastv_keep_reference(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor,
                         attention_mask: Tensor, visual: Tensor, tokens: int,
                         query_pos: Optional[Tensor] = None) -> List[List[int]]:
    """Per row, the positions FastV keeps, from layer K's full eager attention matrix (every
    query, causal and padding masks, float64), read at the query's row."""
    attn = layer.self_attn
    B, T, _ = h.shape
    H, hd = attn.num_heads, attn.head_dim
    x = layer.input_layernorm(h).double()
    cos, sin = cos.double().expand(B, -1, -1, -1), sin.double().expand(B, -1, -1, -1)

    def proj(lin):
        y = x @ lin.weight.double().T + lin.bias.double()
        return apply_partial_rotary(y.view(B, T, H, hd).transpose(1, 2), cos, sin)

    q, k = proj(attn.q_proj), proj(attn.k_proj)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)                      # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    out = []
    for b in range(B):
        qp = T - 1 if query_pos is None else int(query_pos[b])
        row = probs[b, :, qp].mean(0)
        vis = [j for j in range(T) if visual[b, j] and attention_mask[b, j]]
        best = set(sorted(vis, key=lambda j: -float(row[j]))[:tokens])
        out.append([j for j in range(T) if attention_mask[b, j] and (not visual[b, j]
                                                                     or j in best)])
    return out
