"""FlashSloth: SigLIP -> compression (SAP / average pooling / none / a peer's) -> projector ->
Phi-2, with learnable query tokens updated by EmbQ at the input of one decoder layer.

Named submodules (freeze or train each as a whole):

  vision_tower      SiglipVisionTower           patch features F (B, views * N, Cv)
  pooling           SpatialAttentionPool (SAP)  "flashsloth", "sap"; AveragePool for "avgpool";
                                                VisionZip / RandomSelect / Downsample for
                                                "visionzip" / "random" / "downsample"
                                                (flashsloth/compression/); None for "none" and
                                                "fastv"
  token_pruner      FastV                       "fastv" only (drops visual tokens inside the
                                                LLM, prefill only), else None
  mm_projector      Linear(Cv, D), GELU, Linear(D, D)
  learnable_tokens  LearnableTokens (.token (Q, D))   "flashsloth" only, else None
  lqformer          EmbeddedQuery (EmbQ)              "flashsloth" only, else None
  language_model    PhiLanguageModel (embed_tokens, layers, final_layernorm, lm_head)

Sequence: the image placeholder (``config.image_token_id``) in ``input_ids`` is replaced by the
visual tokens of that image and the slot (``config.query_token_id``) by the Q query tokens
(learnable tokens + the embedding of token 764). In the baselines ("sap", "avgpool", "none")
slots are dropped, so one prompt serves every mode. Sequences are re-padded on the left.

At the input of decoder layer ``config.embq_layer`` (counted from 1), during a prefill only,
EmbQ replaces every slot's query hidden states with
``lqformer(queries, question tokens, mask, un-pooled patch features of that sample)``.
The question of the first slot is the text between the image (skipping
``question_skip_after_image`` tokens, the newline of "<image>\\n") and the slot. For a later
turn with labels (training), it starts after the last labelled (answer) token before the slot
plus ``question_skip_after_answer`` tokens (the "USER:" role tokens), as the original. A later
slot without a labelled answer before it (multi-turn inference: no labels) reuses the previous
slot's question, as the original does: every turn's queries then attend to the first question,
not to their own (the original only locates later questions from the labels).
``question_mask`` overrides this (pass it to give each turn its own question).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import IGNORE_INDEX, FlashSlothConfig, check_model_dtype
from .language import KVCache, PhiLanguageModel, TokenPruning
from .vision import SiglipVisionTower

Tensor = torch.Tensor


class LearnableTokens(nn.Module):
    """The Q query vectors; checkpoint key ``learnable_tokens.token`` (Q, D)."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.empty(num_tokens, dim))

    def forward(self) -> Tensor:
        return self.token


class AveragePool(nn.Module):
    """Window x window average pooling of a square patch grid (the LDP-style baseline):
    (B, N, C) -> (B, ceil(g / k)^2, C); partial edge windows average the patches they hold."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        g = math.isqrt(N)
        grid = x.transpose(1, 2).reshape(B, C, g, g)
        # ceil_mode: the last window holds fewer patches; avg_pool2d divides by their count
        out = F.avg_pool2d(grid, self.window, self.window, ceil_mode=True)
        return out.flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"window={self.window}"


@dataclass
class SequenceLayout:
    """Where everything sits in the expanded (left-padded) sequence of length L.

    index: (B, L) long into the embedding bank [zero row, text (B*T), visual (B*M), queries (Q)];
    attention_mask: (B, L) bool; position_ids: (B, L); labels: (B, L) or None;
    slot_rows / slot_starts: (S,) sample and first position of every query slot;
    question_index / question_mask: (S, Lq) positions of each slot's question tokens.
    """

    index: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Optional[Tensor]
    slot_rows: Tensor
    slot_starts: Tensor
    question_index: Tensor
    question_mask: Tensor

    @property
    def length(self) -> int:
        return self.index.shape[1]

    def kept(self, keep: Tensor) -> "SequenceLayout":
        """The layout of the positions ``keep`` (B, L') (-1: padding) after FastV's pruning;
        slot and question fields are unchanged (no mode that prunes has query slots)."""
        idx, pad = keep.clamp(min=0), keep < 0
        labels = (None if self.labels is None
                  else self.labels.gather(1, idx).masked_fill(pad, IGNORE_INDEX))
        return dataclasses.replace(
            self, index=self.index.gather(1, idx).masked_fill(pad, 0),
            attention_mask=self.attention_mask.gather(1, idx) & ~pad,
            position_ids=self.position_ids.gather(1, idx).masked_fill(pad, 0), labels=labels)


@dataclass
class FlashSlothOutput:
    """logits: (B, L, V) over the expanded sequence (or the last ``logits_to_keep`` positions;
    with ``loss_only``, (N, V) at the N positions whose next token is labelled);
    loss: mean next-token cross-entropy over labels != -100 (None without labels);
    attention_mask / labels: (B, L) of the expanded sequence."""

    logits: Tensor
    loss: Optional[Tensor]
    attention_mask: Tensor
    labels: Optional[Tensor]


def _loss_dtype(logits: Tensor) -> Tensor:
    """Logits for the cross-entropy: fp32 for 16-bit and fp32 models, fp64 kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


class FlashSloth(nn.Module):
    """The slim FlashSloth model (see the module docstring for the layout).

    Args:
        config: a FlashSlothConfig (e.g. ``FlashSlothConfig.preset("tiny")``).
        device: where to build it; "meta" builds the 3.2B presets without allocating memory.
            None (default): torch's default device, as for nn.Module constructors (the CPU,
            unless inside ``with torch.device(...)`` or after ``torch.set_default_device``).
        dtype: parameter dtype (default: torch's default dtype, float32).

    Example:
        >>> cfg = FlashSlothConfig.preset("tiny")
        >>> model = FlashSloth(cfg).eval()
        >>> ids = torch.tensor([[5, cfg.image_token_id, 7, 8, 9, cfg.query_token_id, 11]])
        >>> out = model(torch.randn(1, 3, 84, 84), ids)
        >>> out.logits.shape      # 5 text tokens + 4 visual + 9 query tokens
        torch.Size([1, 18, 1024])
    """

    def __init__(self, config: FlashSlothConfig, *, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(config, FlashSlothConfig):
            raise TypeError(f"config: expected a FlashSlothConfig, got {type(config).__name__}")
        config.validate()
        check_model_dtype("dtype", dtype)
        # device=None follows torch's default device, as nn.Module constructors do: a
        # `with torch.device(...)` block or torch.set_default_device(...)
        device = _default_device() if device is None else torch.device(device)
        self.config = config
        # Token ids generate() stops on by default; from_pretrained sets the checkpoint's own
        # (config eos, "</s>" of the fine-tune, generation_config.json), see checkpoint.py
        eos = config.text.eos_token_id
        self.stop_token_ids: Tuple[int, ...] = () if eos is None else (eos,)
        # Build on the meta device, then allocate once in the target dtype and device and
        # initialise there: no float32 copy on the host first (12.8 GB at the 3.2B size).
        with torch.device("meta"):
            self._build(config)
        if dtype is not None:
            self.to(dtype)
        if device.type != "meta":
            if next(self.buffers(), None) is not None:
                raise RuntimeError("FlashSloth: a submodule registered a buffer, which to_empty "
                                   "would leave uninitialised; build it without the meta device")
            self.to_empty(device=device)
            self.reset_parameters()

    def _build(self, cfg: FlashSlothConfig) -> None:
        Cv, D = cfg.vision.hidden_size, cfg.text.hidden_size
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.token_pruner = None                    # FastV ("fastv" only)
        if cfg.compression in ("flashsloth", "sap"):
            from flashsloth_kernels import SpatialAttentionPool

            self.pooling = SpatialAttentionPool(Cv, window=cfg.sap_window)
        elif cfg.compression == "avgpool":
            self.pooling = AveragePool(cfg.sap_window)
        else:   # the peers' modes (flashsloth/compression/): parameter-free; None for "none"
            from .compression import build_pooling, build_pruner

            self.pooling = build_pooling(cfg)
            self.token_pruner = build_pruner(cfg)
        self.mm_projector = nn.Sequential(nn.Linear(Cv, D), nn.GELU(), nn.Linear(D, D))
        if cfg.use_queries:
            from flashsloth_kernels import EmbeddedQuery

            self.learnable_tokens = LearnableTokens(cfg.num_queries, D)
            self.lqformer = EmbeddedQuery(D, Cv, down_dim=cfg.embq_down_dim,
                                          num_heads=cfg.embq_num_heads,
                                          num_layers=cfg.embq_num_layers)
        else:
            self.learnable_tokens = None
            self.lqformer = None
        self.language_model = PhiLanguageModel(cfg.text)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init: normal(0, std) weights, zero biases, unit LayerNorms (as Phi / LLaVA)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        if self.learnable_tokens is not None:
            self.learnable_tokens.token.normal_(0.0, std)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def num_visual_tokens(self) -> int:
        """Visual tokens reaching the LLM per image (image tokens + query tokens)."""
        return self.config.num_visual_tokens()

    def num_parameters(self, module: Optional[str] = None) -> int:
        """Parameters of the whole model or of one named submodule (e.g. "pooling")."""
        target = self if module is None else getattr(self, module)
        return 0 if target is None else sum(p.numel() for p in target.parameters())

    # ------------------------------------------------------------------ images
    def pixel_values(self, images) -> Tensor:
        """Float pixel values as the model expects, from pixel values or raw images.

        images: (B, 3, S, S) float (base) / (B, V, 3, S, S) float (HD), or a list of PIL images /
        uint8 tensors, which are preprocessed as the original (see flashsloth.preprocess).
        """
        if isinstance(images, Tensor) and images.is_floating_point():
            px = images
        else:
            from .preprocess import preprocess_images

            px = preprocess_images(images, self.config)
        cfg = self.config
        S = cfg.vision.image_size
        if cfg.hd:
            want = (cfg.num_views, cfg.vision.num_channels, S, S)
        else:
            want = (cfg.vision.num_channels, S, S)
        if px.dim() != 1 + len(want) or tuple(px.shape[1:]) != want:
            hd = f" (HD: {cfg.num_views} views)" if cfg.hd else ""
            raise ValueError(f"images: expected pixel values of shape "
                             f"(B, {', '.join(map(str, want))}){hd}, got {tuple(px.shape)}")
        return px.to(device=self.device)

    def encode_images(self, pixel_values: Tensor) -> Tuple[Tensor, Tensor]:
        """pixel values (B, 3, S, S) or (B, V, 3, S, S) -> (visual tokens (B, V * G, D),
        un-pooled patch features (B, V * N, Cv)); G = tokens per view, N = patches per view."""
        B = pixel_values.shape[0]
        flat = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values
        if getattr(self.pooling, "needs_attention", False):             # VisionZip
            feats, probs, keys = self.vision_tower(flat, return_attention=True)
            pooled = self.pooling(feats, probs, keys)
        else:
            feats = self.vision_tower(flat)                              # (B*V, N, Cv)
            pooled = feats if self.pooling is None else self.pooling(feats)  # (B*V, G, Cv)
        tokens = self.mm_projector(pooled)
        return tokens.reshape(B, -1, tokens.shape[-1]), feats.reshape(B, -1, feats.shape[-1])

    def query_embeddings(self) -> Tensor:
        """(Q, D): the learnable tokens plus the embedding of ``query_offset_token_id``."""
        q = self.learnable_tokens()
        tid = self.config.query_offset_token_id
        if tid is not None:
            q = q + self.language_model.embed_tokens.weight[tid]
        return q

    # ------------------------------------------------------------------ sequence building
    def _check_ids(self, input_ids, attention_mask, labels, question_mask, batch: Optional[int]):
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids: expected a LongTensor (B, T), "
                            f"got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected shape (B, T) with T >= 1, "
                             f"got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
        if batch is not None and input_ids.shape[0] != batch:
            raise ValueError(f"input_ids: batch {input_ids.shape[0]} does not match the images' "
                             f"batch {batch}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels),
                        ("question_mask", question_mask)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} (that of "
                                 f"input_ids), got {tuple(t.shape)}")
        cfg = self.config
        V = cfg.text.vocab_size
        special = (input_ids == cfg.image_token_id) | (input_ids == cfg.query_token_id)
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(special)
        bad = real & ~special & ((input_ids < 0) | (input_ids >= V))
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"input_ids: token id {int(input_ids[b, t])} at ({b}, {t}) is outside "
                             f"the vocabulary [0, {V}) and is not the image ({cfg.image_token_id}) "
                             f"or slot ({cfg.query_token_id}) marker")

    def build_layout(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                     labels: Optional[Tensor] = None, question_mask: Optional[Tensor] = None,
                     has_images: bool = True) -> SequenceLayout:
        """Expand markers into visual / query positions, re-pad on the left (see SequenceLayout)."""
        cfg = self.config
        B, T = input_ids.shape
        M = cfg.num_image_tokens if has_images else 0
        Q = cfg.num_queries if cfg.use_queries else 0
        text_base, vis_base, q_base = 1, 1 + B * T, 1 + B * T + B * M
        ids_l = input_ids.tolist()
        mask_l = (attention_mask.bool().tolist() if attention_mask is not None
                  else [[True] * T for _ in range(B)])
        lab_l = labels.tolist() if labels is not None else None
        qm_l = question_mask.bool().tolist() if question_mask is not None else None

        rows_index: List[List[int]] = []
        rows_labels: List[List[int]] = []
        slots: List[Tuple[int, int, List[int]]] = []       # (row, start, question positions)
        for b in range(B):
            index: List[int] = []
            labs: List[int] = []
            n_images = 0
            anchor = 0                      # where the next question may start
            after_slot = False              # the anchor is a previous slot (a later turn)
            answer_end = None               # last labelled position since the anchor
            question_pos: List[int] = []    # with question_mask: marked positions since anchor
            prev_qpos: List[int] = []       # the previous slot's question positions
            for t in range(T):
                if not mask_l[b][t]:
                    continue
                tok = ids_l[b][t]
                if tok == cfg.image_token_id:
                    if not has_images:
                        raise ValueError(f"input_ids row {b} holds the image marker "
                                         f"({cfg.image_token_id}) but no images were given")
                    n_images += 1
                    if n_images > 1:
                        raise ValueError(f"input_ids row {b}: more than one image marker "
                                         f"({cfg.image_token_id}); one image per sample is "
                                         "supported")
                    index.extend(range(vis_base + b * M, vis_base + (b + 1) * M))
                    labs.extend([IGNORE_INDEX] * M)
                    anchor = len(index) + cfg.question_skip_after_image
                    after_slot, answer_end, question_pos = False, None, []
                elif tok == cfg.query_token_id:
                    if Q == 0:
                        continue                    # baselines: the slot simply disappears
                    start = len(index)
                    if qm_l is not None:
                        qpos = question_pos
                    elif after_slot and answer_end is None:
                        # A later slot with no labelled answer before it (multi-turn inference):
                        # the original finds later questions only from the labels and gives
                        # such a slot the previous slot's question (so every turn's queries
                        # see the first question); done the same here, for the same logits
                        qpos = list(prev_qpos)
                    else:
                        begin = anchor
                        # A later turn: its question starts after the previous answer (the
                        # labelled tokens) and the role tokens. The first turn's labelled
                        # tokens (a stage-1 caption) are the question itself.
                        if after_slot:
                            begin = max(begin, answer_end + 1 + cfg.question_skip_after_answer)
                        qpos = list(range(min(begin, start), start))
                    prev_qpos = qpos
                    slots.append((b, start, qpos))
                    index.extend(range(q_base, q_base + Q))
                    labs.extend([IGNORE_INDEX] * Q)
                    anchor = len(index)
                    after_slot, answer_end, question_pos = True, None, []
                else:
                    pos = len(index)
                    index.append(text_base + b * T + t)
                    lab = lab_l[b][t] if lab_l is not None else IGNORE_INDEX
                    labs.append(lab)
                    if lab != IGNORE_INDEX:
                        answer_end = pos
                    if qm_l is not None and qm_l[b][t]:
                        question_pos.append(pos)
            if has_images and n_images == 0:
                raise ValueError(f"input_ids row {b} has no image marker ({cfg.image_token_id}); "
                                 "every sample needs one when images are given")
            if Q and has_images and not any(s[0] == b for s in slots):
                raise ValueError(f"input_ids row {b} has no query slot (token id "
                                 f"{cfg.query_token_id}, \"<learnable>\"): FlashSloth needs one "
                                 "after the question (or use compression='sap', 'avgpool' or "
                                 "'none')")
            if not index:
                raise ValueError(f"input_ids row {b} is empty (attention_mask has no real token)")
            rows_index.append(index)
            rows_labels.append(labs)

        L = max(len(r) for r in rows_index)
        dev = input_ids.device
        index = torch.zeros(B, L, dtype=torch.long)
        amask = torch.zeros(B, L, dtype=torch.bool)
        out_labels = (torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
                      if labels is not None else None)
        offsets = []
        for b, (r, lab) in enumerate(zip(rows_index, rows_labels, strict=True)):
            off = L - len(r)
            offsets.append(off)
            index[b, off:] = torch.tensor(r, dtype=torch.long)
            amask[b, off:] = True
            if out_labels is not None:
                out_labels[b, off:] = torch.tensor(lab, dtype=torch.long)
        position_ids = (amask.long().cumsum(1) - 1).clamp(min=0)
        S = len(slots)
        Lq = max([len(s[2]) for s in slots] + [1])
        q_index = torch.zeros(S, Lq, dtype=torch.long)
        q_mask = torch.zeros(S, Lq, dtype=torch.bool)
        for i, (b, _, qpos) in enumerate(slots):
            if qpos:
                q_index[i, :len(qpos)] = torch.tensor(qpos) + offsets[b]
                q_mask[i, :len(qpos)] = True
        return SequenceLayout(
            index=index.to(dev), attention_mask=amask.to(dev), position_ids=position_ids.to(dev),
            labels=None if out_labels is None else out_labels.to(dev),
            slot_rows=torch.tensor([s[0] for s in slots], dtype=torch.long, device=dev),
            slot_starts=torch.tensor([s[1] + offsets[s[0]] for s in slots], dtype=torch.long,
                                     device=dev),
            question_index=q_index.to(dev), question_mask=q_mask.to(dev),
        )

    def embed_layout(self, layout: SequenceLayout, input_ids: Tensor,
                     visual_tokens: Optional[Tensor]) -> Tensor:
        """(B, L, D) input embeddings of the expanded sequence."""
        cfg = self.config
        emb = self.language_model.embed_tokens
        special = (input_ids == cfg.image_token_id) | (input_ids == cfg.query_token_id)
        safe = torch.where(special | (input_ids < 0) | (input_ids >= cfg.text.vocab_size),
                           torch.zeros_like(input_ids), input_ids)
        text = emb(safe).flatten(0, 1)
        parts = [text.new_zeros(1, text.shape[-1]), text]
        if visual_tokens is not None:
            parts.append(visual_tokens.flatten(0, 1).to(text.dtype))
        if cfg.use_queries:
            parts.append(self.query_embeddings().to(text.dtype))
        bank = torch.cat(parts, 0)
        return bank[layout.index]

    def _embq_hook(self, layout: SequenceLayout, patch_features: Optional[Tensor]):
        """The layer hook running EmbQ at the input of decoder layer ``embq_layer`` (or None)."""
        cfg = self.config
        if not cfg.use_queries or patch_features is None or layout.slot_rows.numel() == 0:
            return None
        # A slot with no question tokens keeps its hidden states: there is nothing to attend to
        has_q = layout.question_mask.any(1)
        if not bool(has_q.any()):
            return None
        rows = layout.slot_rows[has_q]
        starts = layout.slot_starts[has_q]
        q_idx = layout.question_index[has_q]
        q_mask = layout.question_mask[has_q]
        target = cfg.embq_layer - 1
        Q = cfg.num_queries

        def hook(i: int, h: Tensor) -> Tensor:
            if i != target:
                return h
            qpos = starts[:, None] + torch.arange(Q, device=h.device)          # (S, Q)
            r = rows[:, None]
            queries = h[r, qpos]                                                # (S, Q, D)
            text = h[r, q_idx] * q_mask[..., None].to(h.dtype)                  # (S, Lq, D)
            image = patch_features[rows].to(h.dtype)                            # (S, N, Cv)
            updated = self.lqformer(queries, text, q_mask, image)
            return h.index_put((r.expand_as(qpos), qpos), updated.to(h.dtype))

        return hook

    def token_pruning(self, layout: SequenceLayout, text_tokens: int) -> Optional[TokenPruning]:
        """FastV's pruning of one call ("fastv" only, else None). ``text_tokens`` = B * T of
        input_ids (the layout's index puts visual rows after them). The ranking query is the
        last position, or with labels the one before each row's first labelled token."""
        if self.token_pruner is None:
            return None
        visual = layout.index > text_tokens            # fastv has no query rows in the bank
        query_pos = None
        if layout.labels is not None:
            labelled = layout.labels != IGNORE_INDEX
            first = torch.where(labelled.any(1), labelled.float().argmax(1),
                                torch.full_like(labelled[:, 0], layout.length, dtype=torch.long))
            query_pos = (first - 1).clamp(min=0)
        return self.token_pruner.plan(visual, layout.attention_mask, query_pos)

    def prepare_inputs(self, images=None, input_ids: Optional[Tensor] = None,
                       attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                       question_mask: Optional[Tensor] = None):
        """(inputs_embeds (B, L, D), layout, layer hook) for the language model."""
        if input_ids is None:
            raise TypeError("input_ids: expected a LongTensor (B, T), got None")
        px = self.pixel_values(images) if images is not None else None
        self._check_ids(input_ids, attention_mask, labels, question_mask,
                        None if px is None else px.shape[0])
        input_ids = input_ids.to(self.device).long()
        layout = self.build_layout(input_ids, attention_mask, labels, question_mask,
                                   has_images=px is not None)
        if layout.length > self.config.text.max_position_embeddings:
            raise ValueError(f"sequence: {layout.length} positions after inserting visual and "
                             f"query tokens exceed the context of "
                             f"{self.config.text.max_position_embeddings}")
        visual, feats = self.encode_images(px.to(self.dtype)) if px is not None else (None, None)
        embeds = self.embed_layout(layout, input_ids, visual)
        return embeds, layout, self._embq_hook(layout, feats)

    # ------------------------------------------------------------------ forward
    def forward(self, images=None, input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                question_mask: Optional[Tensor] = None,
                logits_to_keep: Optional[int] = None,
                loss_only: bool = False) -> FlashSlothOutput:
        """Logits over the expanded sequence, and the loss when ``labels`` are given.

        Args:
            images: pixel values (B, 3, S, S) / (B, 5, 3, S, S) for HD, a list of PIL images or
                uint8 tensors, or None (text only: no image marker allowed).
            input_ids: (B, T) token ids holding one image marker per sample and, in the
                "flashsloth" mode, a slot after each question; may be left-padded.
            attention_mask: (B, T) 1 for real tokens, 0 for padding (default: all real).
            labels: (B, T) next-token targets aligned with input_ids, -100 ignored; visual and
                query positions never carry a loss.
            question_mask: (B, T) bool, optional: the question tokens of each slot (default:
                located as described in the module docstring).
            logits_to_keep: compute logits only for the last positions (None: all).
            loss_only: with ``labels``, run the LM head only at the positions whose next
                token is labelled (the answers): ``logits`` is then (N, V) over those
                positions in (sample, position) order, and a batch without any labelled token
                gives loss 0 (attached to the graph) instead of NaN. The loss is the same;
                training skips the (B, L, V) logits and their gradient, most of a small
                model's step and ~0.4 GB per 2k-token sample at Phi-2's 51200-word vocabulary.
        """
        if loss_only and (labels is None or logits_to_keep is not None):
            raise ValueError("loss_only: needs labels and logits_to_keep=None, got "
                             f"labels={'None' if labels is None else 'a tensor'}, "
                             f"logits_to_keep={logits_to_keep!r}")
        embeds, layout, hook = self.prepare_inputs(images, input_ids, attention_mask, labels,
                                                   question_mask)
        pruning = self.token_pruning(layout, input_ids.numel())
        if loss_only:
            lm = self.language_model
            h = lm.hidden_states(embeds, layout.attention_mask, layout.position_ids,
                                 layer_hook=hook, pruning=pruning)
            if pruning is not None:
                layout = layout.kept(pruning.keep)
            target = layout.labels[:, 1:]
            sel = target != IGNORE_INDEX
            logits = lm.lm_head(h[:, :-1][sel])
            if logits.shape[0]:
                loss = F.cross_entropy(_loss_dtype(logits), target[sel])
            else:       # nothing to learn from: 0, still reaching every trainable weight
                loss = lm.lm_head(h[:, :1]).float().sum() * 0.0
            return FlashSlothOutput(logits, loss, layout.attention_mask, layout.labels)
        logits = self.language_model(embeds, layout.attention_mask, layout.position_ids,
                                     layer_hook=hook, logits_to_keep=logits_to_keep,
                                     pruning=pruning)
        if pruning is not None:     # FastV: the output covers the positions kept
            layout = layout.kept(pruning.keep)
        loss = None
        if layout.labels is not None:
            if logits_to_keep is not None:
                raise ValueError("labels: the loss needs every position's logits "
                                 "(logits_to_keep=None)")
            loss = F.cross_entropy(_loss_dtype(logits[:, :-1].flatten(0, 1)),
                                   layout.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return FlashSlothOutput(logits, loss, layout.attention_mask, layout.labels)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def prefill(self, images=None, input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, question_mask: Optional[Tensor] = None,
                max_new_tokens: int = 0) -> Tuple[Tensor, KVCache]:
        """Run the prompt once and fill a KV cache with room for ``max_new_tokens``.

        Returns (logits of the last position (B, V), cache). EmbQ runs here (and only here).
        """
        embeds, layout, hook = self.prepare_inputs(images, input_ids, attention_mask, None,
                                                   question_mask)
        total = layout.length + max_new_tokens
        ctx = self.config.text.max_position_embeddings
        if total > ctx:
            raise ValueError(f"sequence: {layout.length} prompt positions (visual and query tokens "
                             f"included) + max_new_tokens {max_new_tokens} = {total} exceed the "
                             f"context of {ctx}")
        pruning = self.token_pruning(layout, input_ids.numel())
        pruned = None if pruning is None else (pruning.layer, pruning.length + max_new_tokens)
        cache = KVCache.for_model(self.language_model, embeds.shape[0], total, pruned)
        logits = self.language_model(embeds, layout.attention_mask, layout.position_ids,
                                     cache=cache, layer_hook=hook, logits_to_keep=1,
                                     pruning=pruning)
        return logits[:, -1], cache

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor, cache: KVCache) -> Tensor:
        """One cached decoding step: token_ids (B,) -> next-token logits (B, V)."""
        embeds = self.language_model.embed_tokens(token_ids.reshape(-1, 1))
        logits = self.language_model(embeds, None, cache.next_position[:, None], cache=cache)
        return logits[:, -1]

    @torch.no_grad()
    def generate(self, images=None, input_ids: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, max_new_tokens: int = 32, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None,
                 eos_token_id: "Optional[int | Sequence[int]]" = -1,
                 pad_token_id: Optional[int] = None, use_cache: bool = True,
                 question_mask: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Greedy or sampled generation; batches may be left-padded.

        Returns the new tokens (B, n <= max_new_tokens); after a row's end token it holds
        ``pad_token_id``. ``eos_token_id``: a token id or a sequence of them to stop on; -1
        (default) means ``self.stop_token_ids`` (the config's eos, and for a checkpoint its own
        end tokens: "</s>", generation_config.json, as the original); None: never stop.
        ``use_cache=False`` reruns the full sequence every step (the reference for the cache).
        """
        if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature: expected > 0 when sampling, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a float in (0, 1], got {top_p}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):
            raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
        tcfg = self.config.text
        stops = _stop_ids(eos_token_id, self.stop_token_ids)
        pad = pad_token_id if pad_token_id is not None else (tcfg.pad_token_id or 0)
        if input_ids is None:
            raise TypeError("input_ids: expected a LongTensor (B, T), got None")
        B = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() == 2 else None

        def pick(logits: Tensor) -> Tensor:
            return _next_token(logits.float(), do_sample, temperature, top_k, top_p, generator)

        if use_cache:
            logits, cache = self.prefill(images, input_ids, attention_mask, question_mask,
                                         max_new_tokens)
        else:
            px = self.pixel_values(images) if images is not None else None
            ids = input_ids.to(self.device).long()
            mask = (attention_mask.to(self.device).bool() if attention_mask is not None
                    else torch.ones_like(ids, dtype=torch.bool))
            L0 = self.build_layout(ids, mask, None, question_mask, px is not None).length
            if L0 + max_new_tokens > tcfg.max_position_embeddings:
                raise ValueError(f"sequence: {L0} prompt positions + max_new_tokens "
                                 f"{max_new_tokens} exceed the context of "
                                 f"{tcfg.max_position_embeddings}")
            logits = self(px, ids, mask, question_mask=question_mask,
                          logits_to_keep=1).logits[:, -1]
        out = []
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            tok = pick(logits)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out.append(tok)
            if stops is not None:
                done = done | torch.isin(tok, stops.to(tok.device))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                logits = self.decode_step(tok, cache)
            else:
                ids = torch.cat([ids, tok[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                if question_mask is not None:
                    question_mask = torch.cat(
                        [question_mask, torch.zeros_like(question_mask[:, :1])], 1)
                logits = self(px, ids, mask, question_mask=question_mask,
                              logits_to_keep=1).logits[:, -1]
        return torch.stack(out, 1)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "FlashSloth":
        """Load a checkpoint directory in the original FlashSloth layout (see checkpoint.py)."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, path: str, **kwargs) -> None:
        """Write config.json + safetensors shards in the original FlashSloth layout."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)


def _stop_ids(eos_token_id, default: Tuple[int, ...]) -> Optional[Tensor]:
    """generate()'s eos_token_id as a 1-D tensor of ids (None: never stop)."""
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if eos_token_id is None:
        return None
    if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        ids = list(default) if eos_token_id == -1 else [eos_token_id]
    elif isinstance(eos_token_id, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in eos_token_id):
        ids = list(eos_token_id)
    else:
        raise TypeError(f"eos_token_id: expected an int, a sequence of ints, -1 (the model's "
                        f"stop tokens) or None, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long) if ids else None


def _default_device() -> torch.device:
    """The device a factory function without ``device=`` allocates on right now."""
    return torch.empty(0).device


def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator: Optional[torch.Generator]) -> Tensor:
    """(B, V) float logits -> (B,) next tokens: argmax, or a sample after temperature, top-k
    and top-p."""
    if not do_sample:
        return logits.argmax(-1)
    # Shift the best logit to 0 before dividing: a tiny temperature (1e-45) then sends the
    # others to -inf (greedy in the limit) instead of overflowing to inf - inf = nan
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
