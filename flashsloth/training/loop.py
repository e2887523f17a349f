"""The training run the CLI describes: checks, model and data set-up, resume, the step loop,
evaluation, checkpoints and the final weights."""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterable, List, Optional

import torch

from flashsloth_kernels import _env

from ..config import FlashSlothConfig
from . import checkpoints as ckpt
from .cli import check_device, check_output_dir
from .distributed import (
    barrier,
    full_model_state,
    load_optimizer_state,
    setup_distributed,
    unwrap,
    wrap_model,
)
from .metrics import MetricsLog, Progress, plot_loss
from .stages import (
    LARGE_PRESETS,
    STAGE_DEFAULTS,
    autocast_dtype,
    build_optimizer,
    configure_stage,
    cosine_schedule,
    enable_gradient_checkpointing,
)
from .step import Batch, evaluate, train_step

# A resume must keep these (the data order and the schedule depend on them): refused otherwise
FIXED = ("stage", "world_size", "batch_size", "grad_accum", "total_steps", "seed")
# A resume may change these: each change is warned about, recorded in the run's state
# ("changes" in trainer_state.json and run.json) and used from the resumed step on
CHANGEABLE = ("data", "data_sha256", "eval_data", "image_root", "max_length", "system",
              "on_bad", "check_images", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
              "precision")
# What a run writes into its output folder (besides checkpoint-N/)
RUN_FILES = ("metrics.jsonl", "run.json", "summary.json", "skipped_lines.txt", "loss.png",
             "final")


class RunFinished(Exception):
    """--resume of a run that already finished: nothing to do (the CLI exits 0)."""


def _say(main: bool, text: str) -> None:
    if main:
        print(text, file=sys.stderr, flush=True)


def _tokenizer(args, init_dir: Optional[str]):
    from ..preprocess import Tokenizer

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


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def used_by_a_run(out: str) -> List[str]:
    """What in ``out`` a previous run wrote (empty for a new or unrelated folder)."""
    if not os.path.isdir(out):
        return []
    found = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
    found += [os.path.basename(p) for _, p in ckpt.list_checkpoints(out)]
    found += sorted(e for e in os.listdir(out) if e.startswith(".")
                    and (e.endswith((ckpt.PARTIAL, ckpt.REPLACED)) or ckpt.TMP_FILE in e))
    return found


def _remove_run(out: str) -> None:
    for name in used_by_a_run(out):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def planned_config(args, resume: Optional[str]) -> FlashSlothConfig:
    """The model config the run will train, read without loading weights."""
    from ..checkpoint import read_config, tensor_shapes, weight_files

    src = resume or args.checkpoint
    if src is not None:
        cfg = read_config(src, tensor_shapes(weight_files(src)))
    else:
        cfg = FlashSlothConfig.preset(args.preset or "tiny")
    if args.compression and resume is None:
        cfg = cfg.replace(compression=args.compression)
    return cfg


def _check_resume_model(args, saved_run: Dict[str, Any], cfg: FlashSlothConfig,
                        resume: str) -> None:
    """Refuse what would change the resumed model (compression, preset, initial weights)."""
    if args.compression and args.compression != cfg.compression:
        raise ValueError(f"--resume: the checkpoint {resume} is a {cfg.compression!r} model; "
                         f"--compression {args.compression} would change the model (and drop "
                         "its trained weights); resume without --compression, or start a new "
                         "run from it with --checkpoint")
    source = saved_run.get("source") or {}
    if args.preset and source.get("preset") not in (None, args.preset):
        raise ValueError(f"--resume: the run was started from --preset {source['preset']}, "
                         f"not {args.preset}; a resume continues the checkpoint's model: drop "
                         "--preset or pass the run's own")
    if args.checkpoint and source.get("checkpoint") not in (None, os.path.abspath(args.checkpoint)):
        raise ValueError(f"--resume: the run was started from --checkpoint "
                         f"{source['checkpoint']}, not {os.path.abspath(args.checkpoint)}; a "
                         "resume continues the checkpoint's weights: drop --checkpoint or pass "
                         "the run's own")


def _write_skipped(out: str, lines: List[str]) -> None:
    ckpt.atomic_write_text(os.path.join(out, "skipped_lines.txt"),
                           "".join(line + "\n" for line in lines))


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the training the parsed CLI arguments describe; returns a summary (rank 0)."""
    from torch.utils.data import DataLoader

    from ..data import ConversationDataset, DataError, ShardedSampler, collate
    from ..model import FlashSloth
    from ..preprocess import SYSTEM_PROMPT

    # ---- checks that need no work: flags, device, output folder, resume, model, context
    out = args.output_dir
    check_device(args.device)
    if args.resume is not None and args.overwrite:
        raise ValueError("--resume and --overwrite: pass one (continue the run in --output-dir, "
                         "or replace it)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir: {out!r} exists and is not a directory")
    used = used_by_a_run(out)
    if used and args.resume is None and not args.overwrite:
        shown = ", ".join(used[:6]) + (" ..." if len(used) > 6 else "")
        raise ValueError(f"--output-dir: {out!r} already holds a run ({shown}); pass --resume "
                         "latest to continue it, or --overwrite to replace it")
    check_output_dir(out)
    saved: Optional[Dict[str, Any]] = None
    resume = args.resume
    skipped_incomplete: List[str] = []
    if resume == "latest":
        resume = ckpt.latest_checkpoint(
            out, on_skip=lambda p, probs: skipped_incomplete.append(
                f"--resume latest: passing over the incomplete {p} (lacks {'; '.join(probs)})"))
    elif resume is not None:
        ckpt.require_complete(resume)
    if resume is not None:
        with open(os.path.join(resume, "trainer_state.json")) as fh:
            saved = json.load(fh)
        total_saved = saved["run"].get("total_steps")
        final = os.path.join(out, "final")
        if total_saved is not None and saved["step"] >= total_saved and ckpt.is_complete(final):
            if _env.torchrun_env()[1] == 0:
                for line in ckpt.clean_leftovers(out):
                    _say(True, f"cleaned up: {line}")
            raise RunFinished(f"the run in {out} already finished: step {saved['step']} of "
                              f"{total_saved} is done and its weights are in {final}; nothing "
                              "to do (to train further, start a new run with --checkpoint "
                              f"{final})")
    cfg_plan = planned_config(args, resume)
    if saved is not None:
        _check_resume_model(args, saved["run"], cfg_plan, resume)
    context = cfg_plan.text.max_position_embeddings
    if args.max_length is not None and args.max_length > context:
        raise ValueError(f"--max-length: {args.max_length} is longer than the model's context "
                         f"({context} positions, max_position_embeddings); pass at most "
                         f"{context}")

    # ---- processes, leftovers of killed writes
    if args.threads:
        torch.set_num_threads(args.threads)
    info = setup_distributed(args.device)
    main_proc = info.rank == 0
    if main_proc:
        for line in skipped_incomplete:
            _say(True, line)
        if args.overwrite and used:
            _remove_run(out)
            _say(True, f"--overwrite: removed the previous run in {out}")
        for line in ckpt.clean_leftovers(out):
            _say(True, f"cleaned up: {line}")
        if args.resume == "latest" and resume is None:
            _say(True, f"--resume latest: no complete checkpoint in {out}; starting from scratch")
    barrier()

    # ---- model
    torch.manual_seed(args.seed)
    init_dir = resume or args.checkpoint
    if init_dir is not None:
        model = FlashSloth.from_pretrained(init_dir, dtype=torch.float32,
                                           compression=None if resume else args.compression)
    else:
        model = FlashSloth(cfg_plan)
    cfg = model.config
    model.to(info.device).train()
    trainable = configure_stage(model, args.stage)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    # ---- data
    system = SYSTEM_PROMPT if args.system is None else args.system
    tokenizer = _tokenizer(args, args.checkpoint)
    skipped: List[str] = []
    data_kw = {"system": system, "image_root": args.image_root, "max_length": args.max_length,
               "on_bad": args.on_bad, "cache_images": args.cache_images,
               "report": lambda issue: skipped.append(str(issue)),
               "check_images": args.check_images}
    train_set = ConversationDataset(args.data, tokenizer, cfg, **data_kw)
    eval_set = ConversationDataset(args.eval_data, tokenizer, cfg, **data_kw) \
        if args.eval_data else None
    if main_proc:
        for line in skipped:
            _say(True, f"skipped {line}")
        _write_skipped(out, skipped)
        if skipped:
            _say(True, f"{len(skipped)} bad data line(s) skipped (listed in "
                       f"{os.path.join(out, 'skipped_lines.txt')})")
    reported = set(skipped)

    def report_load_issues(issues) -> None:
        for issue in issues:
            text = str(issue)
            if text in reported:
                continue
            if args.on_bad == "error":
                raise DataError([issue])
            reported.add(text)
            print(f"skipped {text} (rank {info.rank})" if info.world_size > 1
                  else f"skipped {text}", file=sys.stderr, flush=True)
            with open(os.path.join(out, "skipped_lines.txt"), "a") as fh:
                fh.write(text + "\n")

    sampler = ShardedSampler(len(train_set), world_size=info.world_size, rank=info.rank,
                             seed=args.seed)
    micro_per_epoch = -(-sampler.per_rank // args.batch_size)
    steps_per_epoch = -(-micro_per_epoch // args.grad_accum)
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))

    # ---- optimisation
    strategy = args.strategy
    if strategy == "auto":
        large = args.preset in LARGE_PRESETS or cfg.text.hidden_size >= 2048
        strategy = "fsdp" if large else "ddp"
    amp = autocast_dtype(args.precision, info.device)
    wrapped = wrap_model(model, strategy, info)
    optimizer = build_optimizer(wrapped, args.stage, args.lr, args.weight_decay)
    new_lrs = [g["lr"] for g in optimizer.param_groups]
    new_wds = [g["weight_decay"] for g in optimizer.param_groups]
    scheduler = cosine_schedule(optimizer, total, args.warmup_ratio)
    scaler = torch.amp.GradScaler(info.device.type) if amp == torch.float16 else None
    state = ckpt.TrainState()
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl") if main_proc else None)
    lr = args.lr if args.lr is not None else STAGE_DEFAULTS[args.stage][0]
    run = {"stage": args.stage, "world_size": info.world_size, "batch_size": args.batch_size,
           "grad_accum": args.grad_accum, "total_steps": total, "seed": args.seed,
           "strategy": strategy if info.world_size > 1 else "none",
           "precision": str(amp).replace("torch.", "") if amp else "fp32",
           "compression": cfg.compression,
           "source": {"preset": None if args.checkpoint else (args.preset or "tiny"),
                      "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None},
           "data": os.path.abspath(args.data),
           "data_sha256": _file_sha256(args.data) if main_proc else None,
           "eval_data": os.path.abspath(args.eval_data) if args.eval_data else None,
           "image_root": os.path.abspath(args.image_root) if args.image_root else None,
           "max_length": args.max_length, "system": system, "on_bad": args.on_bad,
           "check_images": args.check_images, "lr": lr, "weight_decay": args.weight_decay,
           "warmup_ratio": args.warmup_ratio, "max_grad_norm": args.max_grad_norm,
           "trainable_parameters": sum(p.numel() for n, p in unwrap(wrapped).named_parameters()
                                       if n in set(trainable)),
           "changes": []}
    rng = None
    resumed_at = None
    if resume is not None:
        prev = saved["run"]
        if prev.get("source"):
            run["source"] = prev["source"]
        for key in FIXED:
            if prev.get(key) != run[key]:
                raise ValueError(f"--resume: the checkpoint was written with {key} = "
                                 f"{prev.get(key)!r}, this run has {run[key]!r}; resume with "
                                 "the same settings (the data order and schedule depend on them)")
        loaded = ckpt.load_checkpoint(resume, info.rank)
        load_optimizer_state(wrapped, optimizer, loaded["optimizer"])
        extra = loaded["extra"]
        if extra["scheduler"] is not None:
            scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and extra["scaler"] is not None:
            scaler.load_state_dict(extra["scaler"])
        state = ckpt.TrainState(**extra["state"])
        resumed_at = state.step
        rng = loaded["rng"]
        run["changes"] = list(prev.get("changes", []))
        for key in CHANGEABLE:
            if key not in prev or (key == "data_sha256" and run[key] is None):
                continue
            if prev[key] != run[key]:
                run["changes"].append({"step": state.step, "setting": key, "from": prev[key],
                                       "to": run[key]})
                what = ("the data file's content changed since the checkpoint"
                        if key == "data_sha256" else
                        f"{key} changed from {prev[key]!r} to {run[key]!r}")
                _say(main_proc, f"warning: --resume: {what}; continuing with the new value from "
                                f"step {state.step} (recorded in run.json and the next "
                                "checkpoints' trainer_state.json)")
        # The schedule continues with this run's peak lr and weight decay (the optimizer's
        # saved hyper-parameters would otherwise override them)
        if new_lrs != list(scheduler.base_lrs):
            scheduler.base_lrs = list(new_lrs)
            for group, base in zip(optimizer.param_groups, new_lrs):
                group["initial_lr"] = base
                group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        for group, wd in zip(optimizer.param_groups, new_wds):
            group["weight_decay"] = wd
        _say(main_proc, f"resumed from {resume} at step {state.step}")
    if main_proc:
        metrics.resume_at(state.step)
        ckpt.atomic_write_text(os.path.join(out, "run.json"),
                               json.dumps({**run, "args": vars(args)}, indent=2, default=str))

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
        report_load_issues(res.pop("issues", []))
        metrics.write({"split": "eval", "step": state.step, "eval_loss": res["loss"],
                       "eval_accuracy": res["accuracy"], "samples": res["samples"]})
        return res

    def checkpoint_dir(step: int) -> str:
        return os.path.join(out, f"{ckpt.CHECKPOINT_PREFIX}{step:07d}")

    title = f"stage {args.stage} ({cfg.compression})"
    progress = Progress(total, state.step, main_proc, not args.no_progress, args.log_every)
    last_result = None
    try:
        while state.step < total:
            sampler.set_epoch(state.epoch, start=state.micro_in_epoch * args.batch_size)
            groups = _micro_batches(loader, args.grad_accum)
            if rng is not None:                 # after the iterator exists: nothing draws after
                ckpt.set_rng_state(rng)
                rng = None
            for group in groups:
                for b in group:
                    report_load_issues(b.get("issues", []))
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
                metrics.write({"split": "train", "step": state.step, "epoch": state.epoch,
                               "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
                               "tokens": res.tokens, "samples": res.samples, "step_time": dt,
                               "samples_per_s": res.samples / dt,
                               "tokens_per_s": res.tokens / dt, "elapsed": state.elapsed,
                               "skipped": res.skipped})
                progress.update(state.step, total, res.loss, res.samples / dt, res.tokens / dt)
                if eval_set is not None and args.eval_every and state.step % args.eval_every == 0:
                    run_eval()
                if args.save_every and state.step % args.save_every == 0 and state.step < total:
                    ckpt.save_checkpoint(checkpoint_dir(state.step), wrapped, optimizer,
                                         scheduler, scaler, state, run)
                    if main_proc:
                        plot_loss(os.path.join(out, "metrics.jsonl"),
                                  os.path.join(out, "loss.png"), title)
                if state.step >= total:
                    break
            else:
                state.epoch += 1
                state.micro_in_epoch = 0
    finally:
        progress.close()
    final_eval = run_eval() if eval_set is not None else None
    if resumed_at != state.step:         # a resume of the last checkpoint has it already
        ckpt.save_checkpoint(checkpoint_dir(state.step), wrapped, optimizer, scheduler, scaler,
                             state, run)
    model_state = full_model_state(wrapped)
    summary = {"step": state.step, "samples": state.samples, "tokens": state.tokens,
               "elapsed_s": state.elapsed, "final_loss": last_result.loss if last_result else None,
               "eval": final_eval, "skipped_lines": len(reported), "output_dir": out}
    error = None
    if main_proc:
        try:
            ckpt.save_final(os.path.join(out, "final"), model_state, cfg,
                            getattr(tokenizer, "path", None))
        except ckpt.CheckpointWriteError as exc:
            error = exc
        else:
            plot_loss(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"), title)
            ckpt.atomic_write_text(os.path.join(out, "summary.json"),
                                   json.dumps(summary, indent=2))
    if not ckpt._all_ok(error is None, info.device):
        raise error if error is not None else ckpt.CheckpointWriteError(
            errno.EIO, f"rank 0 could not write {os.path.join(out, 'final')} (see its message)")
    return summary
