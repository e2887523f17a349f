"""Training stages and the optimisation recipe: which parameters each stage trains, AdamW,
the cosine schedule with warm-up, gradient checkpointing and the autocast dtype."""

from __future__ import annotations

import math
from typing import List, Optional, Union

import torch
from torch import nn

from .distributed import unwrap

STAGES = (1, 2)
# (learning rate, weight decay) of each stage, as the original's scripts
STAGE_DEFAULTS = {1: (1e-3, 0.0), 2: (2e-5, 0.0)}
# Stage 1 trains these submodules only; stage 2 everything except ALWAYS_FROZEN
STAGE1_TRAINABLE = ("pooling", "mm_projector")
ALWAYS_FROZEN = ("vision_tower",)
LARGE_PRESETS = ("flashsloth-3.2b", "flashsloth-hd-3.2b")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _check_stage(stage) -> int:
    if isinstance(stage, str) and stage.strip().isdigit():
        stage = int(stage)
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage: expected 1 (alignment) or 2 (instruction tuning), got {stage!r}")
    return stage


def configure_stage(model: nn.Module, stage: Union[int, str]) -> List[str]:
    """Freeze and unfreeze a FlashSloth for a training stage; returns the trainable parameter
    names (in ``named_parameters`` order).

    stage 1 (alignment): SAP ("pooling") and the projector ("mm_projector") train; the vision
    tower, the LLM, the query tokens and EmbQ are frozen. With compression "avgpool" / "none"
    there is no SAP, so only the projector trains.
    stage 2 (instruction tuning): everything trains except the vision tower.

    Call it before wrapping the model in DDP / FSDP (they record which parameters need grads).
    """
    stage = _check_stage(stage)
    base = unwrap(model)
    names = []
    for name, p in base.named_parameters():
        top = name.split(".", 1)[0]
        trainable = top in STAGE1_TRAINABLE if stage == 1 else top not in ALWAYS_FROZEN
        p.requires_grad_(trainable)
        if trainable:
            names.append(name)
    if not names:
        raise ValueError(f"stage {stage}: the model has no parameter to train")
    return names


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute every LLM decoder layer's activations in the backward pass instead of keeping
    them (the original trains with gradient checkpointing). Parameter names do not change (the
    layers' ``forward`` is wrapped per instance). Returns the number of layers wrapped."""
    from torch.utils.checkpoint import checkpoint

    lm = unwrap(model).language_model
    for layer in lm.layers:
        if getattr(layer, "_flashsloth_checkpointed", False):
            continue
        inner = layer.forward

        def forward(h, cos, sin, mask, cache, layer_idx, _inner=inner):
            # The KV cache is written in place: never recompute a cached (generation) call
            if cache is not None or not torch.is_grad_enabled():
                return _inner(h, cos, sin, mask, cache, layer_idx)
            return checkpoint(_inner, h, cos, sin, mask, cache, layer_idx, use_reentrant=False)

        layer.forward = forward
        layer._flashsloth_checkpointed = True
    return len(lm.layers)


def build_optimizer(model: nn.Module, stage: Union[int, str], lr: Optional[float] = None,
                    weight_decay: Optional[float] = None, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad (call :func:`configure_stage` first).

    lr / weight_decay default to the stage's (1e-3 / 2e-5, no decay). With decay, biases,
    LayerNorms and the query tokens are not decayed (as HF's Trainer).
    """
    stage = _check_stage(stage)
    d_lr, d_wd = STAGE_DEFAULTS[stage]
    lr = d_lr if lr is None else float(lr)
    weight_decay = d_wd if weight_decay is None else float(weight_decay)
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "learnable_tokens" not in name else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: no parameter requires grad (call configure_stage)")
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_ratio: float = 0.03) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ceil(warmup_ratio * total_steps) steps, then cosine decay to 0
    (HF's get_cosine_schedule_with_warmup, which the original uses)."""
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio: expected in [0, 1), got {warmup_ratio}")
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(precision: str, device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The autocast dtype of a precision name on a device (None: full fp32).

    "auto": bf16 on a GPU that supports it, else fp16 on GPU; fp32 on CPU (bf16 autocast on
    CPU is available as "bf16" but slower than fp32 on most CPUs).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    if precision == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

