"""One optimizer step (loss over answer tokens, gradient accumulation, clipping, fp16
scaling), held-out evaluation, and random batches for tests and benchmarks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IGNORE_INDEX, FlashSlothConfig
from .distributed import dist_ready as _dist_ready
from .distributed import fsdp_forward_warnings, unwrap

Tensor = torch.Tensor
Batch = Dict[str, Any]


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


def forward_loss(model: nn.Module, batch: Batch,
                 autocast_dtype: Optional[torch.dtype] = None, *, loss_only: bool = False):
    """(summed answer-token loss (0-dim, fp32, with graph), answer tokens, model output).
    ``loss_only``: the model computes logits at the answer positions only (training; see
    FlashSloth.forward); the output's logits are then (answer tokens, V)."""
    base = unwrap(model)
    device = base.device
    inputs = _model_inputs(batch, device)
    if loss_only:
        inputs["loss_only"] = True
    with _autocast(device, autocast_dtype), fsdp_forward_warnings(model):
        out = model(**inputs)
    n = int((out.labels[:, 1:] != IGNORE_INDEX).sum())
    # The model's loss is the mean over this micro-batch's answer tokens; the step normalises
    # by the tokens of the whole step (all micro-batches, all processes) instead.
    if loss_only:
        loss_sum = out.loss.float() * n     # 0, attached to the graph, when n == 0
    else:
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
                           float(sum(int(b["input_ids"].shape[0]) - len(b.get("issues") or ())
                                     for b in micro))],
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
            loss, _, _ = forward_loss(model, mb, autocast_dtype, loss_only=True)
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
    reproduces the answer. Returns {"loss", "accuracy", "samples", "issues" (the DataIssue
    of each sample whose image failed to decode: not counted)} and, with ``per_sample``,
    "correct": {line number: bool} (the process's own share only when distributed).
    """
    from ..data import collate

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
    issues: list = []
    for start in range(0, per_rank, batch_size):
        idx = mine[start:start + batch_size]
        samples = [dataset[i % n] for i in idx]
        batch = collate(samples, pad_token_id)
        # padding repeats and samples whose image failed to decode are not counted
        keep = torch.tensor([i < n and s.get("issue") is None for i, s in zip(idx, samples)],
                            device=device)
        issues.extend(s["issue"] for i, s in zip(idx, samples)
                      if i < n and s.get("issue") is not None)
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
              "accuracy": float(totals[2] / max(1.0, float(count))), "samples": int(count),
              "issues": issues}
    if per_sample:
        result["correct"] = correct_by_line
    return result

