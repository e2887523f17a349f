"""Training memory: peak memory of one training step in the stage-1 and stage-2 settings, with
and without compression.

Stage 1 (alignment) trains the projector and SAP, everything else frozen; stage 2
(instruction tuning) trains everything but the vision tower (FlashSloth's two stages, see
the spec). The step is the package trainer's (flashsloth.train: configure_stage,
build_optimizer, train_step: forward, loss, backward, gradient clipping, AdamW step) when it
exists; otherwise a plain step built here with the same freezing: forward with labels, loss,
backward, AdamW step, gradients set to None. The row's ``step_impl`` says which ran.
One warm-up step first creates the optimizer state, so the measured step is a steady one.

Reported per (preset, stage, compression): trainable parameters, bytes of weights, of
optimizer state, the high-water mark of the step above what was allocated before it
(activations, gradients, temporaries), their total, and the step's time. The batch is
``BATCH`` copies of the benchmark prompt (model.py) followed by a labelled 16-token answer.
No gradient checkpointing (the original trains with it on; this measures the plain step).
"""

from __future__ import annotations

import time
from typing import List

import torch

from .common import Case, Row, RunConfig, free_memory, status_row
from .model import _why, model_config, pixel_shape, prompt_ids, visual_tokens_in_layout
from .timing import _quartiles, peak_memory_bytes, synchronize

SECTION = "train"
STAGES = ("stage1", "stage2")
COMPRESSIONS = ("none", "sap", "flashsloth")
N_ANSWER = 16
BATCH = 2
LR = {"stage1": 1e-3, "stage2": 2e-5}


def default_presets(cfg: RunConfig) -> List[str]:
    if cfg.presets is not None:
        return list(cfg.presets)
    if cfg.on_gpu:
        return ["flashsloth-3.2b"]
    return ["tiny"] if cfg.quick else ["tiny-27"]


def trainable_for(model, stage: str) -> List[str]:
    """Submodules trained in ``stage`` (the rest is frozen): the plain step's freezing."""
    if stage == "stage1":
        names = ["mm_projector", "pooling"]
    else:
        names = ["mm_projector", "pooling", "learnable_tokens", "lqformer", "language_model"]
    return [n for n in names if getattr(model, n, None) is not None
            and any(True for _ in getattr(model, n).parameters())]


def _trainer():
    """flashsloth.train's (configure_stage, build_optimizer, train_step), or None while the
    package has no trainer."""
    try:
        from flashsloth.train import build_optimizer, configure_stage, train_step
    except (ImportError, AttributeError):
        return None
    return configure_stage, build_optimizer, train_step


def _batch(cfg, device):
    ids = prompt_ids(cfg, BATCH)
    g = torch.Generator().manual_seed(1)
    answer = torch.randint(3, min(cfg.text.vocab_size, 700), (BATCH, N_ANSWER), generator=g)
    ids = torch.cat([ids, answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -N_ANSWER:] = answer
    return ids.to(device), labels.to(device)


def _setup(model, stage: str, px, ids, labels):
    """(step function, optimizer, trained module names, note) for ``stage``."""
    trainer = _trainer()
    if trainer is not None:
        configure_stage, build_optimizer, train_step = trainer
        names = configure_stage(model, 1 if stage == "stage1" else 2)
        opt = build_optimizer(model, 1 if stage == "stage1" else 2)
        batch = {"images": px, "input_ids": ids, "attention_mask": None, "labels": labels,
                 "question_mask": None}

        def step():
            return train_step(model, batch, opt)

        trained = sorted({n.split(".", 1)[0] for n in names})
        return step, opt, trained, "flashsloth.train.train_step"
    model.requires_grad_(False)
    trained = trainable_for(model, stage)
    for name in trained:
        getattr(model, name).requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[stage], weight_decay=0.0)

    def step():
        out = model(px, ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step, opt, trained, "plain step (flashsloth.train is not available)"


def _run(preset: str, stage: str, compression: str, cfg_run: RunConfig) -> List[Row]:
    from flashsloth.model import FlashSloth

    base: Row = {"section": SECTION, "case": f"{preset}/{stage}/{compression}", "provider": "-",
                 "mode": "train step", "preset": preset, "stage": stage,
                 "compression": compression, "dtype": cfg_run.dtype_name}
    dev = cfg_run.device
    try:
        cfg, note = model_config(preset, compression, extra_positions=N_ANSWER)
        torch.manual_seed(0)
        model = FlashSloth(cfg, device=dev, dtype=cfg_run.dtype)
    except Exception as exc:
        status = "not available" if isinstance(exc, ImportError) else "error"
        return [{**base, "status": status, "note": _why(exc)}]
    model.train()
    ids, labels = _batch(cfg, dev)
    px = torch.rand(pixel_shape(cfg, BATCH), device=dev).to(cfg_run.dtype)
    step, opt, trained, impl = _setup(model, stage, px, ids, labels)
    seq_len = visual_tokens_in_layout(model, ids)[1]
    step()  # warm-up: creates the optimizer state
    reps = 3 if cfg_run.on_gpu and not cfg_run.quick else 2
    times = []
    for _ in range(reps):
        synchronize(dev)
        t0 = time.perf_counter()
        step()
        synchronize(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = peak_memory_bytes(step, dev)
    weights = int(sum(p.nbytes for p in model.parameters()))
    opt_state = int(sum(t.nbytes for s in opt.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor)))
    _, med, _ = _quartiles(times)
    row: Row = {**base, "status": "ok", "note": note,
                "step_impl": impl, "trained_modules": ",".join(trained),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "weights_bytes": weights, "optimizer_state_bytes": opt_state,
                "step_peak_bytes": peak,
                "peak_mem_bytes": None if peak is None else weights + opt_state + peak,
                "step_ms": med, "batch": BATCH, "seq_len": seq_len}
    del model, opt, step
    free_memory(dev)
    return [row]


def cases(cfg: RunConfig) -> List[Case]:
    try:
        import flashsloth.model  # noqa: F401
    except Exception as exc:
        return [Case(SECTION, "train", lambda exc=exc: [status_row(
            SECTION, "train", "not available", f"the flashsloth model package cannot be "
            f"imported: {_why(exc)}")])]
    out: List[Case] = []
    for preset in default_presets(cfg):
        for stage in STAGES:
            for comp in COMPRESSIONS:
                out.append(Case(SECTION, f"{preset} {stage} {comp}",
                                lambda p=preset, s=stage, c=comp: _run(p, s, c, cfg)))
    return out


def finalize(rows: List[Row]) -> None:
    """Reduction of the step's total peak memory against "none" (same preset and stage)."""
    none = {(r["preset"], r["stage"]): r for r in rows if r.get("section") == SECTION
            and r.get("compression") == "none" and r.get("status") == "ok"}
    for r in rows:
        if r.get("section") != SECTION or r.get("status") != "ok":
            continue
        ref = none.get((r["preset"], r["stage"]))
        if ref is None:
            continue
        for key in ("peak_mem_bytes", "step_peak_bytes"):
            if ref.get(key) and r.get(key) is not None:
                r[f"{key}_reduction_pct"] = 100.0 * (1 - r[key] / ref[key])
