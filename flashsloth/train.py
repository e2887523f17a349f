"""Two-stage FlashSloth training on one process or many (torchrun: DDP, or FSDP for 3.2B).

    # stage 1 (alignment): SAP + projector train; vision tower, LLM, query tokens, EmbQ frozen
    python -m flashsloth.train --stage 1 --preset tiny --data data/train.jsonl \\
        --tokenizer data/tokenizer.json --output-dir runs/stage1
    # stage 2 (instruction tuning): everything but the vision tower, from stage 1's weights
    python -m flashsloth.train --stage 2 --checkpoint runs/stage1/final --data data/train.jsonl \\
        --tokenizer data/tokenizer.json --output-dir runs/stage2
    # several GPUs (or CPU processes with the gloo backend): torchrun, nothing home-made
    torchrun --nproc-per-node 8 -m flashsloth.train --stage 2 --checkpoint ... --strategy fsdp

Stage defaults follow the original (docs: /work/shared/spec "Training"): AdamW, lr 1e-3
(stage 1) / 2e-5 (stage 2), cosine decay with 3% linear warm-up, no weight decay, gradient
clipping at 1.0. The data format is flashsloth.data's (JSONL of image + conversation turns,
one query slot per turn, loss on answer tokens only).

Output directory::

    checkpoint-0000100/   config.json + model.safetensors (the original layout: loadable by
                          FlashSloth.from_pretrained and `python -m flashsloth.generate`),
                          optimizer.pt (AdamW state keyed by parameter name),
                          trainer_state.pt / .json (step, data position, schedule, scaler),
                          rng_state_<rank>.pt (each process's RNG, so dropout replays exactly)
    final/                the trained weights (same layout, no optimizer)
    metrics.jsonl         one line per optimizer step (loss, lr, grad norm, throughput) and per
                          evaluation; a resumed run drops the lines past its checkpoint
    loss.png              the loss curve drawn from metrics.jsonl
    skipped_lines.txt     the data lines that were skipped, with their line numbers

Reusable pieces (the benchmark suite's training-memory section uses them):
:func:`configure_stage`, :func:`build_optimizer`, :func:`cosine_schedule`, :func:`train_step`,
:func:`evaluate`, :func:`random_batch`, :func:`enable_gradient_checkpointing`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from flashsloth_kernels import _env

from .config import COMPRESSIONS, IGNORE_INDEX, PRESETS, FlashSlothConfig

Tensor = torch.Tensor
Batch = Dict[str, Any]

STAGES = (1, 2)
# (learning rate, weight decay) of each stage, as the original's scripts
STAGE_DEFAULTS = {1: (1e-3, 0.0), 2: (2e-5, 0.0)}
# Stage 1 trains these submodules only; stage 2 everything except ALWAYS_FROZEN
STAGE1_TRAINABLE = ("pooling", "mm_projector")
ALWAYS_FROZEN = ("vision_tower",)
LARGE_PRESETS = ("flashsloth-3.2b", "flashsloth-hd-3.2b")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------- model set-up
def unwrap(model: nn.Module) -> nn.Module:
    """The FlashSloth inside a DistributedDataParallel wrapper (FSDP2 shards in place)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


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


# ---------------------------------------------------------------------------- the step
@dataclass
class StepResult:
    """What one optimizer step did, summed over micro-batches and processes.

    loss: mean cross-entropy per answer token; tokens: answer tokens; samples: sequences;
    grad_norm: total gradient norm before clipping (inf/nan when an fp16 step was skipped);
    lr: the learning rate used; skipped: the fp16 scaler skipped the update.
    """

    loss: float
    tokens: int
    samples: int
    grad_norm: float
    lr: float
    skipped: bool = False


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def answer_tokens(batch: Batch) -> int:
    """Labelled tokens the loss counts: labels != -100 after each row's first real token (the
    first token has no prediction)."""
    labels = batch["labels"]
    mask = batch.get("attention_mask")
    real = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    first = real.long().argmax(1, keepdim=True)
    pos = torch.arange(labels.shape[1], device=labels.device)[None]
    return int(((labels != IGNORE_INDEX) & real & (pos > first)).sum())


def _model_inputs(batch: Batch, device: torch.device) -> dict:
    def move(key):
        value = batch.get(key)
        return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value

    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(f"batch: expected keys input_ids and labels (and images, attention_mask, "
                         f"question_mask), got {sorted(batch)}")
    return {"images": move("images"), "input_ids": move("input_ids"),
            "attention_mask": move("attention_mask"), "labels": move("labels"),
            "question_mask": move("question_mask")}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_autocast_safe(model: nn.Module) -> List[str]:
    """Run the fused SAP and EmbQ modules outside autocast, in their parameters' dtype.

    Their registered ops are not autocast-aware: inside an autocast region the C++ CPU kernel
    receives a low-precision GEMM result where it expects fp32 ("expected scalar type Float but
    found BFloat16"). Both are a small part of the compute, so they run in fp32 there and the
    rest of the model in bf16 / fp16. Wraps ``forward`` per instance (names unchanged);
    idempotent. Returns the wrapped submodule names.
    """
    base = unwrap(model)
    wrapped = []
    for name in ("pooling", "lqformer"):
        mod = getattr(base, name, None)
        params = list(mod.parameters()) if mod is not None else []
        if not params or getattr(mod, "_flashsloth_autocast_safe", False):
            continue
        inner = mod.forward
        dtype = params[0].dtype

        def forward(*args, _inner=inner, _dtype=dtype, **kwargs):
            device_type = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
            if not torch.is_autocast_enabled(device_type):
                return _inner(*args, **kwargs)
            cast = [a.to(_dtype) if isinstance(a, Tensor) and a.is_floating_point() else a
                    for a in args]
            with torch.autocast(device_type=device_type, enabled=False):
                return _inner(*cast, **kwargs)

        mod.forward = forward
        mod._flashsloth_autocast_safe = True
        wrapped.append(name)
    return wrapped


def forward_loss(model: nn.Module, batch: Batch,
                 autocast_dtype: Optional[torch.dtype] = None):
    """(summed answer-token loss (0-dim, fp32, with graph), answer tokens, model output)."""
    base = unwrap(model)
    device = base.device
    inputs = _model_inputs(batch, device)
    if autocast_dtype is not None:
        make_autocast_safe(base)
    with _autocast(device, autocast_dtype):
        out = model(**inputs)
    n = int((out.labels[:, 1:] != IGNORE_INDEX).sum())
    # The model's loss is the mean over this micro-batch's answer tokens; the step normalises
    # by the tokens of the whole step (all micro-batches, all processes) instead.
    loss_sum = out.loss.float() * n if n else out.logits.sum() * 0.0
    return loss_sum, n, out


def train_step(model: nn.Module, batch: Union[Batch, Sequence[Batch]],
               optimizer: torch.optim.Optimizer, scaler=None, *,
               scheduler=None, autocast_dtype: Optional[torch.dtype] = None,
               max_grad_norm: Optional[float] = 1.0) -> StepResult:
    """One optimizer step over a batch, or over a list of micro-batches (gradient accumulation).

    The loss is the mean over every answer token of the step: micro-batches, and processes
    when torch.distributed is initialised (their token count is all-reduced and DDP / FSDP
    average the gradients), so N micro-batches of b samples on P processes give the same
    update as one batch of N * P * b samples.

    Args:
        model: a FlashSloth, or one wrapped in DDP / FSDP; in train mode, stage configured.
        batch: a dict as flashsloth.data.collate returns (images, input_ids, attention_mask,
            labels, question_mask), or a list of them.
        optimizer: e.g. from :func:`build_optimizer`; its gradients are zeroed at the end.
        scaler: a torch.amp.GradScaler for fp16 (None otherwise).
        scheduler: stepped once after the update (e.g. :func:`cosine_schedule`).
        autocast_dtype: torch.bfloat16 / torch.float16 to run the forward under autocast.
        max_grad_norm: clip the total gradient norm (None: no clipping, the norm is still
            measured).

    Returns a :class:`StepResult`.
    """
    micro = [batch] if isinstance(batch, dict) else list(batch)
    if not micro:
        raise ValueError("batch: got an empty list of micro-batches")
    device = unwrap(model).device
    counts = torch.tensor([float(sum(answer_tokens(b) for b in micro)),
                           float(sum(int(b["input_ids"].shape[0]) for b in micro))],
                          dtype=torch.float64, device=device)
    world = 1
    if _dist_ready():
        world = torch.distributed.get_world_size()
        torch.distributed.all_reduce(counts)
    total_tokens, total_samples = int(counts[0]), int(counts[1])
    # DDP / FSDP average gradients over processes: multiply back by the world size
    scale = world / max(1, total_tokens)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    no_sync = getattr(model, "no_sync", None)
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            loss, _, _ = forward_loss(model, mb, autocast_dtype)
            scaled = loss * scale
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().double()
    if _dist_ready():
        torch.distributed.all_reduce(loss_sum)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    if hasattr(norm, "full_tensor"):          # FSDP2: a DTensor
        norm = norm.full_tensor()
    norm = float(norm)
    lr = float(optimizer.param_groups[0]["lr"])
    skipped = False
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < before
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepResult(loss=float(loss_sum) / max(1, total_tokens), tokens=total_tokens,
                      samples=total_samples, grad_norm=norm, lr=lr, skipped=skipped)


def random_batch(config: FlashSlothConfig, batch_size: int, *, question_tokens: int = 16,
                 answer_tokens: int = 8, turns: int = 1, system_tokens: int = 8,
                 generator: Optional[torch.Generator] = None, device=None) -> Batch:
    """A batch of random token ids and pixel values in the training format (for benchmarks
    and tests): per turn ``question_tokens`` question ids, the slot, ``answer_tokens``
    labelled answer ids ending with EOS; one image marker after ``system_tokens`` ids."""
    for name, v in (("batch_size", batch_size), ("question_tokens", question_tokens),
                    ("answer_tokens", answer_tokens), ("turns", turns)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    V = config.text.vocab_size
    eos = config.text.eos_token_id if config.text.eos_token_id is not None else 0

    def rand(n):
        return torch.randint(3, min(V, 700), (batch_size, n), generator=generator)

    cols_ids, cols_lab, cols_q = [rand(system_tokens)], [None], [False]
    cols_ids.append(torch.full((batch_size, 1), config.image_token_id))
    cols_lab.append(None), cols_q.append(False)
    for _ in range(turns):
        cols_ids.append(rand(question_tokens)), cols_lab.append(None), cols_q.append(True)
        cols_ids.append(torch.full((batch_size, 1), config.query_token_id))
        cols_lab.append(None), cols_q.append(False)
        ans = torch.cat([rand(answer_tokens - 1), torch.full((batch_size, 1), eos)], 1)
        cols_ids.append(ans), cols_lab.append(True), cols_q.append(False)
    ids = torch.cat(cols_ids, 1)
    labels = torch.cat([c if lab else torch.full_like(c, IGNORE_INDEX)
                        for c, lab in zip(cols_ids, cols_lab)], 1)
    qmask = torch.cat([torch.full(c.shape, q, dtype=torch.bool)
                       for c, q in zip(cols_ids, cols_q)], 1)
    S = config.vision.image_size
    shape = (batch_size, config.num_views, 3, S, S) if config.hd else (batch_size, 3, S, S)
    images = torch.rand(shape, generator=generator) * 2 - 1
    batch = {"images": images, "input_ids": ids,
             "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels,
             "question_mask": qmask}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, batch_size: int = 32,
             autocast_dtype: Optional[torch.dtype] = None, pad_token_id: int = 0,
             per_sample: bool = False) -> Dict[str, Any]:
    """Answer-token loss and answer accuracy on a dataset (split across processes when
    torch.distributed is initialised; every process must call it).

    A sample counts as correct when the argmax at every answer position (its EOS included)
    is the labelled token, given the correct answer so far: exactly when greedy decoding
    reproduces the answer. Returns {"loss", "accuracy", "samples"} and, with ``per_sample``,
    "correct": {line number: bool} (the process's own share only when distributed).
    """
    from .data import collate

    was_training = model.training
    model.eval()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if _dist_ready() else (0, 1)
    n = len(dataset)
    per_rank = -(-n // world)
    # Every process runs the same number of forwards (FSDP needs it); padding repeats are
    # computed but not counted.
    mine = [(rank + world * j) for j in range(per_rank)]
    device = unwrap(model).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, tokens, correct
    count = torch.zeros((), dtype=torch.float64, device=device)
    correct_by_line: Dict[int, bool] = {}
    for start in range(0, per_rank, batch_size):
        idx = mine[start:start + batch_size]
        samples = [dataset[i % n] for i in idx]
        batch = collate(samples, pad_token_id)
        keep = torch.tensor([i < n for i in idx], device=device)
        loss_sum, _, out = forward_loss(model, batch, autocast_dtype)
        lab = out.labels[:, 1:]
        pred = out.logits[:, :-1].argmax(-1)
        has = lab != IGNORE_INDEX
        ok = ((pred == lab) | ~has).all(1) & has.any(1)
        logp = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), lab,
                               ignore_index=IGNORE_INDEX, reduction="none").sum(1)
        totals[0] += logp[keep].sum().double()
        totals[1] += has[keep].sum().double()
        totals[2] += ok[keep].sum().double()
        count += keep.sum().double()
        if per_sample:
            for line, good, k in zip(batch["lines"], ok.tolist(), keep.tolist()):
                if k:
                    correct_by_line[line] = bool(good)
    if _dist_ready():
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(count)
    if was_training:
        model.train()
    result = {"loss": float(totals[0] / max(1.0, float(totals[1]))),
              "accuracy": float(totals[2] / max(1.0, float(count))), "samples": int(count)}
    if per_sample:
        result["correct"] = correct_by_line
    return result


# ---------------------------------------------------------------------------- checkpoints
class _StateView:
    """What checkpoint.save_pretrained reads from a model, around a full state dict (FSDP
    models are sharded: the state dict is gathered first)."""

    def __init__(self, state: Dict[str, Tensor], config: FlashSlothConfig):
        self._state = state
        self.config = config
        self.dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)

    def state_dict(self):
        return self._state


def _full_model_state(model: nn.Module) -> Dict[str, Tensor]:
    """Every process must call this under FSDP (it gathers); rank 0 gets the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if _dist_ready() and _is_fsdp(model):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def _is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def _optimizer_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if _dist_ready() and _is_fsdp(model):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    else:
        opts = StateDictOptions()
    return get_optimizer_state_dict(model, optimizer, options=opts)


def _load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True) if (_dist_ready() and _is_fsdp(model)) \
        else StateDictOptions()
    set_optimizer_state_dict(model, optimizer, state, options=opts)


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, the epoch, micro-batches of it consumed."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    samples: int = 0
    tokens: int = 0
    elapsed: float = 0.0


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str, model: nn.Module, optimizer, scheduler, scaler,
                    state: TrainState, run: Dict[str, Any]) -> None:
    """Write a resumable checkpoint directory (see the module docstring). Every process must
    call it (FSDP gathers; each process writes its RNG state); rank 0 writes the rest."""
    from .checkpoint import save_pretrained

    rank = torch.distributed.get_rank() if _dist_ready() else 0
    model_state = _full_model_state(model)
    optim_state = _optimizer_state(model, optimizer)
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        save_pretrained(_StateView(model_state, unwrap(model).config), path)
        torch.save(optim_state, os.path.join(path, "optimizer.pt"))
        torch.save({"scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "state": asdict(state)}, os.path.join(path, "trainer_state.pt"))
        with open(os.path.join(path, "trainer_state.json"), "w") as fh:
            json.dump({**asdict(state), "run": run}, fh, indent=2)
    if _dist_ready():
        torch.distributed.barrier()          # the directory exists before others write to it
    torch.save(_rng_state(), os.path.join(path, f"rng_state_{rank}.pt"))
    if _dist_ready():
        torch.distributed.barrier()


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint-N directory with the largest N that is complete (None if none)."""
    found = []
    for d in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        tail = os.path.basename(d)[len("checkpoint-"):]
        if tail.isdigit() and os.path.isfile(os.path.join(d, "trainer_state.json")):
            found.append((int(tail), d))
    return max(found)[1] if found else None


def load_model_state(model: nn.Module, path: str) -> None:
    """Fill an (unwrapped) FlashSloth with a checkpoint directory's weights, strictly."""
    from .checkpoint import check_keys, from_original_key, iter_tensors, tensor_shapes, \
        to_original_key, weight_files

    files = weight_files(path)
    expected = {to_original_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, tensor_shapes(files), model.config, path)
    state = {}
    for key, value in iter_tensors(files):
        if key in expected:
            state[from_original_key(key)] = value
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------- logs and plots
class MetricsLog:
    """metrics.jsonl of rank 0: one JSON object per line. ``resume_at(step)`` drops the lines
    past a checkpoint's step, so a resumed run continues one curve."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def resume_at(self, step: int) -> None:
        if not self.path or not os.path.isfile(self.path):
            return
        with open(self.path) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        keep = [r for r in rows if r.get("step", 0) <= step]
        with open(self.path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in keep)

    def write(self, row: Dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> List[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_loss(metrics_path: str, out_path: str, title: str = "training loss") -> Optional[str]:
    """Draw the train loss per step (with a moving average) and eval losses from
    metrics.jsonl into a PNG; returns the path (None without matplotlib or data)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    if not train:
        return None
    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    k = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1])
              for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot(steps, loss, color="#9ecae1", lw=0.8, label="train (per step)")
    ax.plot(steps, smooth, color="#08519c", lw=1.6, label=f"train ({k}-step mean)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                color="#d94801", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


class _Progress:
    """Rank 0's progress: a rich bar with loss and throughput, or (``bar=False``, or without
    rich) a plain line every ``log_every`` steps. Other ranks print nothing."""

    def __init__(self, total: int, start: int, main: bool, bar: bool, log_every: int):
        self.log_every = max(1, log_every)
        self.main = main
        self.bar = None
        if main and bar:
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)
            except ImportError:
                pass
            else:
                self.bar = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                                    TextColumn("loss {task.fields[loss]:.4f}"),
                                    TextColumn("{task.fields[sps]:.1f} samples/s"),
                                    TextColumn("{task.fields[tps]:.0f} tok/s"),
                                    TimeElapsedColumn(), TimeRemainingColumn())
                self.task = self.bar.add_task("train", total=total, completed=start,
                                              loss=float("nan"), sps=0.0, tps=0.0)
                self.bar.start()

    def update(self, step: int, total: int, loss: float, sps: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, sps=sps, tps=tps)
        elif self.main and (step % self.log_every == 0 or step == total):
            print(f"step {step}/{total} loss {loss:.4f} {sps:.1f} samples/s {tps:.0f} tok/s",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.
    A single process (no torchrun) gets world size 1 and no process group."""
    world, rank, local = _env.torchrun_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not _dist_ready():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def wrap_model(model: nn.Module, strategy: str, info: DistInfo,
               mixed: Optional[torch.dtype] = None) -> nn.Module:
    """DDP or FSDP (FSDP2 ``fully_shard``: each decoder and vision layer, then the root) when
    distributed; the model itself otherwise."""
    if info.world_size == 1 or strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 kept it under _composable
            from torch.distributed._composable.fsdp import fully_shard
        import warnings

        # FSDP2 warns that the root returns views (the logits slice); the trainer never
        # modifies outputs in place, which is what the warning is about
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        for layer in list(model.vision_tower.encoder.layers) + list(model.language_model.layers):
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"strategy: expected 'ddp', 'fsdp' or 'none', got {strategy!r}")


# ---------------------------------------------------------------------------- the run
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashsloth.train",
                                description="Train FlashSloth (stage 1: alignment, stage 2: "
                                            "instruction tuning) on a JSONL data file.")
    p.add_argument("--stage", required=True, type=int, choices=STAGES)
    p.add_argument("--data", required=True, help="training JSONL (see flashsloth.data)")
    p.add_argument("--eval-data", help="held-out JSONL: loss and answer accuracy are logged")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="random-init preset (default tiny)")
    src.add_argument("--checkpoint", help="initial weights: a checkpoint directory (the original "
                                          "layout, e.g. stage 1's final/)")
    p.add_argument("--compression", choices=COMPRESSIONS, help="override the compression mode")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding it (default: the "
                                       "checkpoint's, else the data file's directory)")
    p.add_argument("--system", default=None, help="system prompt (default: the original's)")
    p.add_argument("--image-root", help="directory of relative image paths (default: the data "
                                        "file's directory)")
    p.add_argument("--max-length", type=int, help="longest sequence with visual and query tokens "
                                                  "(default: the model's context)")
    p.add_argument("--on-bad", choices=("skip", "error"), default="skip",
                   help="bad data lines: skip and report them (default) or stop")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="default: 1e-3 (stage 1), 2e-5 (stage 2)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 (fp16 without bf16) on GPU, fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--strategy", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="with torchrun: auto = fsdp for the 3.2B presets, ddp otherwise")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only "
                                                             "at the end)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps (0: at the end only)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--resume", help="a checkpoint directory, or 'latest' (in --output-dir)")
    p.add_argument("--log-every", type=int, default=10,
                   help="a plain log line every N steps (with --no-progress)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--cache-images", action="store_true",
                   help="keep preprocessed images in memory (small data sets)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    return p


def _tokenizer(args, init_dir: Optional[str]):
    from .preprocess import Tokenizer

    path = args.tokenizer
    if path is None:
        for d in (init_dir, os.path.dirname(os.path.abspath(args.data))):
            if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
                path = d
                break
    if path is None:
        raise ValueError("tokenizer: pass --tokenizer (a tokenizer.json or its directory); none "
                         "was found beside the checkpoint or the data file")
    return Tokenizer(path)


def _micro_batches(loader, accum: int) -> Iterable[List[Batch]]:
    group: List[Batch] = []
    for b in loader:
        group.append(b)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the training the parsed CLI arguments describe; returns a summary (rank 0)."""
    from torch.utils.data import DataLoader

    from .data import ConversationDataset, ShardedSampler, collate
    from .model import FlashSloth
    from .preprocess import SYSTEM_PROMPT

    for name in ("batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, "
                             f"got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps: expected >= 1, got {args.max_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = setup_distributed(args.device)
    main_proc = info.rank == 0
    out = args.output_dir
    resume = args.resume
    if resume == "latest":
        resume = latest_checkpoint(out)
        if resume is None and main_proc:
            print(f"--resume latest: no checkpoint in {out}; starting from scratch",
                  file=sys.stderr)
    if resume is not None and not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise ValueError(f"--resume: {resume!r} is not a checkpoint directory "
                         "(no trainer_state.json)")

    torch.manual_seed(args.seed)
    init_dir = resume or args.checkpoint
    if init_dir is not None:
        model = FlashSloth.from_pretrained(init_dir, dtype=torch.float32,
                                           compression=args.compression)
    else:
        cfg = FlashSlothConfig.preset(args.preset or "tiny")
        if args.compression:
            cfg = cfg.replace(compression=args.compression)
        model = FlashSloth(cfg)
    cfg = model.config
    model.to(info.device).train()
    trainable = configure_stage(model, args.stage)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    system = SYSTEM_PROMPT if args.system is None else args.system
    tokenizer = _tokenizer(args, args.checkpoint)
    if main_proc:
        os.makedirs(out, exist_ok=True)
    skipped: List[str] = []
    train_set = ConversationDataset(args.data, tokenizer, cfg, system=system,
                                    image_root=args.image_root, max_length=args.max_length,
                                    on_bad=args.on_bad, cache_images=args.cache_images,
                                    report=lambda issue: skipped.append(str(issue)))
    eval_set = None
    if args.eval_data:
        eval_set = ConversationDataset(args.eval_data, tokenizer, cfg, system=system,
                                       image_root=args.image_root, max_length=args.max_length,
                                       on_bad=args.on_bad, cache_images=args.cache_images,
                                       report=lambda issue: skipped.append(str(issue)))
    if main_proc and skipped:
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
        with open(os.path.join(out, "skipped_lines.txt"), "w") as fh:
            fh.writelines(line + "\n" for line in skipped)
        print(f"{len(skipped)} bad data line(s) skipped (listed in "
              f"{os.path.join(out, 'skipped_lines.txt')})", file=sys.stderr)

    sampler = ShardedSampler(len(train_set), world_size=info.world_size, rank=info.rank,
                             seed=args.seed)
    micro_per_epoch = -(-sampler.per_rank // args.batch_size)
    steps_per_epoch = -(-micro_per_epoch // args.grad_accum)
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))

    strategy = args.strategy
    if strategy == "auto":
        large = args.preset in LARGE_PRESETS or cfg.text.hidden_size >= 2048
        strategy = "fsdp" if large else "ddp"
    amp = autocast_dtype(args.precision, info.device)
    wrapped = wrap_model(model, strategy, info)
    optimizer = build_optimizer(wrapped, args.stage, args.lr, args.weight_decay)
    scheduler = cosine_schedule(optimizer, total, args.warmup_ratio)
    scaler = torch.amp.GradScaler(info.device.type) if amp == torch.float16 else None
    state = TrainState()
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl") if main_proc else None)
    run = {"stage": args.stage, "world_size": info.world_size, "batch_size": args.batch_size,
           "grad_accum": args.grad_accum, "total_steps": total, "seed": args.seed,
           "strategy": strategy if info.world_size > 1 else "none",
           "precision": str(amp).replace("torch.", "") if amp else "fp32",
           "compression": cfg.compression, "data": os.path.abspath(args.data),
           "trainable_parameters": sum(p.numel() for n, p in unwrap(wrapped).named_parameters()
                                       if n in set(trainable))}
    rng = None
    if resume is not None:
        with open(os.path.join(resume, "trainer_state.json")) as fh:
            saved = json.load(fh)
        for key in ("stage", "world_size", "batch_size", "grad_accum", "total_steps", "seed"):
            if saved["run"].get(key) != run[key]:
                raise ValueError(f"--resume: the checkpoint was written with {key} = "
                                 f"{saved['run'].get(key)!r}, this run has {run[key]!r}; resume "
                                 "with the same settings (the data order and schedule depend "
                                 "on them)")
        _load_optimizer_state(wrapped, optimizer,
                              torch.load(os.path.join(resume, "optimizer.pt"), weights_only=True))
        extra = torch.load(os.path.join(resume, "trainer_state.pt"), weights_only=True)
        if extra["scheduler"] is not None:
            scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and extra["scaler"] is not None:
            scaler.load_state_dict(extra["scaler"])
        state = TrainState(**extra["state"])
        rng_file = os.path.join(resume, f"rng_state_{info.rank}.pt")
        rng = torch.load(rng_file, weights_only=True) if os.path.isfile(rng_file) else None
        metrics.resume_at(state.step)
        if main_proc:
            print(f"resumed from {resume} at step {state.step}", file=sys.stderr)
    if main_proc:
        with open(os.path.join(out, "run.json"), "w") as fh:
            json.dump({**run, "args": vars(args)}, fh, indent=2, default=str)

    pad = cfg.text.pad_token_id or 0
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                        collate_fn=functools.partial(collate, pad_token_id=pad),
                        num_workers=args.num_workers,
                        # its own generator: creating the iterator must not draw from the
                        # global RNG, or a resumed run's dropout masks would differ
                        generator=torch.Generator().manual_seed(args.seed))

    def run_eval():
        res = evaluate(wrapped, eval_set, batch_size=args.eval_batch_size, autocast_dtype=amp,
                       pad_token_id=pad)
        metrics.write({"split": "eval", "step": state.step, "eval_loss": res["loss"],
                       "eval_accuracy": res["accuracy"], "samples": res["samples"]})
        return res

    progress = _Progress(total, state.step, main_proc, not args.no_progress, args.log_every)
    last_result = None
    try:
        while state.step < total:
            sampler.set_epoch(state.epoch, start=state.micro_in_epoch * args.batch_size)
            groups = _micro_batches(loader, args.grad_accum)
            if rng is not None:                 # after the iterator exists: nothing draws after
                _set_rng_state(rng)
                rng = None
            for group in groups:
                t0 = time.perf_counter()
                res = train_step(wrapped, group, optimizer, scaler, scheduler=scheduler,
                                 autocast_dtype=amp, max_grad_norm=args.max_grad_norm or None)
                dt = time.perf_counter() - t0
                state.step += 1
                state.micro_in_epoch += len(group)
                state.samples += res.samples
                state.tokens += res.tokens
                state.elapsed += dt
                last_result = res
                row = {"split": "train", "step": state.step, "epoch": state.epoch,
                       "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
                       "tokens": res.tokens, "samples": res.samples, "step_time": dt,
                       "samples_per_s": res.samples / dt, "tokens_per_s": res.tokens / dt,
                       "elapsed": state.elapsed, "skipped": res.skipped}
                metrics.write(row)
                progress.update(state.step, total, res.loss, res.samples / dt, res.tokens / dt)
                if eval_set is not None and args.eval_every and state.step % args.eval_every == 0:
                    run_eval()
                if args.save_every and state.step % args.save_every == 0 and state.step < total:
                    save_checkpoint(os.path.join(out, f"checkpoint-{state.step:07d}"), wrapped,
                                    optimizer, scheduler, scaler, state, run)
                    if main_proc:
                        plot_loss(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"),
                                  f"stage {args.stage} ({cfg.compression})")
                if state.step >= total:
                    break
            else:
                state.epoch += 1
                state.micro_in_epoch = 0
    finally:
        progress.close()
    final_eval = run_eval() if eval_set is not None else None
    save_checkpoint(os.path.join(out, f"checkpoint-{state.step:07d}"), wrapped, optimizer,
                    scheduler, scaler, state, run)
    model_state = _full_model_state(wrapped)
    summary = {"step": state.step, "samples": state.samples, "tokens": state.tokens,
               "elapsed_s": state.elapsed, "final_loss": last_result.loss if last_result else None,
               "eval": final_eval, "skipped_lines": len(skipped), "output_dir": out}
    if main_proc:
        from .checkpoint import save_pretrained

        save_pretrained(_StateView(model_state, cfg), os.path.join(out, "final"))
        tok_src = getattr(tokenizer, "path", None)
        if tok_src and os.path.isfile(tok_src):
            import shutil

            shutil.copyfile(tok_src, os.path.join(out, "final", "tokenizer.json"))
        plot_loss(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"),
                  f"stage {args.stage} ({cfg.compression})")
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    if _dist_ready():
        torch.distributed.barrier()
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError

    try:
        summary = train(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if _dist_ready():
            torch.distributed.destroy_process_group()
    if _env.torchrun_env()[1] == 0:
        ev = summary["eval"]
        extra = f", held-out loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.3f}" if ev else ""
        print(f"done: {summary['step']} steps, final loss {summary['final_loss']:.4f}{extra}; "
              f"weights in {os.path.join(summary['output_dir'], 'final')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
