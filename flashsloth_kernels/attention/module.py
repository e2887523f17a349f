"""``EmbeddedQuery``: FlashSloth's EmbQ (the original's LQFormer) as an nn.Module."""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import nn

from .. import _checks
from .op import MAX_HEAD_DIM, fused, query_patch_attention

Tensor = torch.Tensor


class _CrossAttention(nn.Module):
    """q / k / v projections of one EmbQ attention step (no output projection).

    Named and shaped as the original ``lqformerattention``: q_proj, k_proj: down -> down,
    v_proj: value_dim -> value_dim (it projects the values in their own width).
    """

    def __init__(self, down_dim: int, value_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(down_dim, down_dim)
        self.k_proj = nn.Linear(down_dim, down_dim)
        self.v_proj = nn.Linear(value_dim, value_dim)


class _EmbQLayer(nn.Module):
    """One EmbQ layer: text -> query (t2q) then image -> query (i2q), with its LayerNorms."""

    def __init__(self, vision_dim: int, down_dim: int):
        super().__init__()
        self.t2q_attn = _CrossAttention(down_dim, down_dim)
        self.i2q_attn = _CrossAttention(down_dim, vision_dim)
        self.ln_text = nn.LayerNorm(down_dim)
        self.ln_q = nn.LayerNorm(down_dim)
        self.ln_kv = nn.LayerNorm(down_dim)


class EmbeddedQuery(nn.Module):
    """FlashSloth's embedded query (EmbQ): updates the query tokens' hidden states from the
    question's text states and the un-pooled image features.

    Per layer, with Dt = down_projector_learnable_text (shared by queries and text) and
    Di = down_projector_image::

        Q0 = ln_q(Dt Hq),  T = ln_text(Dt Ht),  Khat = ln_kv(Di F)
        A1 = MHA(q = Wq1 Q0, k = Wk1 T, v = Wv1 T, text_mask)       (B, Q, down_dim)
        A2 = MHA(q = Wq2 A1, k = Wk2 Khat, v = Wv2 F)                (B, Q, vision_dim)
        Hq <- Hq + up_projector(A2)

    with num_heads heads in both steps (key heads of down_dim / num_heads, i2q value heads of
    vision_dim / num_heads), scale 1 / sqrt(down_dim / num_heads), no output projection. Both
    attention steps run through :func:`query_patch_attention` (fp32 logits and softmax).
    The state_dict keys are those of the original checkpoints (``model.lqformer.*``), so
    their weights load with no renaming; at llm_dim 2560, vision_dim 1152 the module has
    8,084,416 parameters.

    A question with no text tokens (text_states of shape (B, 0, llm_dim)) is the extreme case
    of all-padding text: the text step contributes zero (A1 = 0).

    Differences from the original, both outside what FlashSloth runs: a sample whose text is
    all padding gets A1 = 0 (the original's additive -1e4 mask gives a uniform average of the
    padding); with num_layers > 1 each layer down-projects the updated Hq (the original, built
    with one layer, feeds every layer the projection of the initial Hq).

    Args:
        llm_dim: hidden size of the LLM (2560 for Phi-2).
        vision_dim: channels of the image features (1152 for SigLIP).
        down_dim: width of the attention (576).
        num_heads: heads of both attention steps (32); must divide down_dim and vision_dim.
        num_layers: EmbQ layers (1 in FlashSloth), chained through Hq.
        backend: backend of the attention calls (None: FLASHSLOTH_BACKEND / auto).

    Shapes: forward(query_states (B, Q, llm_dim), text_states (B, T, llm_dim),
    text_mask (B, T) bool (True = real token) or None, image_features (B, N, vision_dim))
    -> (B, Q, llm_dim), the updated query states (residual included).

    Example:
        >>> embq = EmbeddedQuery(2560, 1152)
        >>> hq = embq(torch.randn(1, 9, 2560), torch.randn(1, 20, 2560),
        ...           torch.ones(1, 20, dtype=torch.bool), torch.randn(1, 729, 1152))
        >>> hq.shape
        torch.Size([1, 9, 2560])
    """

    def __init__(self, llm_dim: int, vision_dim: int, down_dim: int = 576, num_heads: int = 32,
                 num_layers: int = 1, *, backend: Optional[str] = None):
        super().__init__()
        for name, value in (("llm_dim", llm_dim), ("vision_dim", vision_dim),
                            ("down_dim", down_dim), ("num_heads", num_heads),
                            ("num_layers", num_layers)):
            _checks.positive_int(name, value)
        for name, dim in (("down_dim", down_dim), ("vision_dim", vision_dim)):
            if dim % num_heads:
                raise ValueError(f"{name}: {dim} is not a multiple of num_heads = {num_heads}")
            if dim // num_heads > MAX_HEAD_DIM:
                raise ValueError(f"{name}: heads of {name} / num_heads = {dim // num_heads} dims "
                                 f"exceed the attention's limit of {MAX_HEAD_DIM}")
        if backend is not None:
            fused.requested(backend)  # a TypeError / ValueError naming backend
        self.llm_dim = llm_dim
        self.vision_dim = vision_dim
        self.down_dim = down_dim
        self.num_heads = num_heads
        self.backend = backend
        self.scale = (down_dim // num_heads) ** -0.5
        self.down_projector_learnable_text = nn.Linear(llm_dim, down_dim)
        self.down_projector_image = nn.Linear(vision_dim, down_dim)
        self.layers = nn.ModuleList(_EmbQLayer(vision_dim, down_dim) for _ in range(num_layers))
        self.up_projector = nn.Linear(vision_dim, llm_dim)

    def _attend(self, attn: _CrossAttention, x_q: Tensor, x_k: Tensor, x_v: Tensor,
                mask: Optional[Tensor]) -> Tensor:
        """(B, Lq, down), (B, Lk, down), (B, Lk, value_dim) -> (B, Lq, value_dim)."""
        B, Lq, Lk, h = x_q.shape[0], x_q.shape[1], x_k.shape[1], self.num_heads
        dk = self.down_dim // h
        dv = x_v.shape[2] // h
        # explicit head sizes (not -1): Lk may be 0 (a question with no text tokens)
        q = attn.q_proj(x_q).view(B, Lq, h, dk).transpose(1, 2)
        k = attn.k_proj(x_k).view(B, Lk, h, dk).transpose(1, 2)
        v = attn.v_proj(x_v).view(B, Lk, h, dv).transpose(1, 2)
        out = query_patch_attention(q, k, v, mask, self.scale, backend=self.backend)
        return out.transpose(1, 2).reshape(B, Lq, -1)

    def forward(self, query_states: Tensor, text_states: Tensor, text_mask: Optional[Tensor],
                image_features: Tensor) -> Tensor:
        _checks.tensor("query_states", query_states, ndim=3)
        _checks.tensor("text_states", text_states, ndim=3)
        _checks.tensor("image_features", image_features, ndim=3)
        _checks.same_dtype_device("query_states", query_states, text_states=text_states,
                                  image_features=image_features)
        param_dtype = self.up_projector.weight.dtype
        device_type = query_states.device.type
        if query_states.dtype != param_dtype and not (
                device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)):
            raise TypeError(
                f"query_states: dtype {query_states.dtype} does not match the module's parameters' "
                f"dtype {param_dtype}; convert one to the other (module.to({query_states.dtype}) "
                f"or the inputs .to({param_dtype})), or run under torch.autocast")
        B = query_states.shape[0]
        _checks.shape("query_states", query_states, (B, None, self.llm_dim),
                      f"(B, Q, llm_dim = {self.llm_dim})")
        _checks.shape("text_states", text_states, (B, None, self.llm_dim),
                      f"(B, T, llm_dim = {self.llm_dim}) with B = {B} from query_states")
        _checks.shape("image_features", image_features, (B, None, self.vision_dim),
                      f"(B, N, vision_dim = {self.vision_dim}) with B = {B} from query_states")
        mask = None
        if text_mask is not None:
            _checks.tensor("text_mask", text_mask, floating=False)
            if text_mask.dtype.is_floating_point or text_mask.dtype.is_complex:
                raise TypeError(f"text_mask: expected a bool (or 0/1 integer) tensor, "
                                f"got {text_mask.dtype}")
            if text_mask.device != query_states.device:
                raise ValueError(f"text_mask: expected a tensor on query_states' device "
                                 f"{query_states.device}, got {text_mask.device}")
            _checks.shape("text_mask", text_mask, (B, text_states.shape[1]),
                          f"(B, T) from text_states {tuple(text_states.shape)}")
            mask = text_mask if text_mask.dtype == torch.bool else text_mask != 0

        down = self.down_projector_learnable_text
        text_down = down(text_states)
        image_down = self.down_projector_image(image_features)
        hq = query_states
        for module in self.layers:
            layer = cast(_EmbQLayer, module)
            q0 = layer.ln_q(down(hq))
            t = layer.ln_text(text_down)
            a1 = self._attend(layer.t2q_attn, q0, t, t, mask)
            a2 = self._attend(layer.i2q_attn, a1, layer.ln_kv(image_down), image_features, None)
            hq = hq + self.up_projector(a2)
        return hq

    def extra_repr(self) -> str:
        return (f"llm_dim={self.llm_dim}, vision_dim={self.vision_dim}, down_dim={self.down_dim}, "
                f"num_heads={self.num_heads}, backend={self.backend!r}")
