"""The command line: ``python -m flashsloth.train`` (or torchrun ... -m flashsloth.train).

Every user error (a flag out of range, a device that is not there, an output folder that is
a file or cannot be written, a used output folder without --resume/--overwrite, a bad data
file, a resume that would change the model) is one line ``error: ...`` on stderr and exit
code 2, found before any work; a checkpoint that cannot be written (disk full) is one line
and exit code 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Optional, Sequence

import torch

from flashsloth_kernels import _env

from ..config import COMPRESSIONS, PRESETS
from .stages import PRECISIONS, STAGES


class _Parser(argparse.ArgumentParser):
    """argparse, with one-line errors: ``error: argument --epochs: ...`` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _number(kind: Callable, what: str, ok: Callable[[float], bool]):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


INT_POS = _number(int, "an integer >= 1", lambda v: v >= 1)
INT_NONNEG = _number(int, "an integer >= 0", lambda v: v >= 0)
FLOAT_POS = _number(float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
FLOAT_NONNEG = _number(float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
FLOAT_CLIP = _number(float, "a number >= 0 (0 or inf: no clipping)",
                     lambda v: not math.isnan(v) and v >= 0)
FLOAT_RATIO = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m flashsloth.train",
                description="Train FlashSloth (stage 1: alignment, stage 2: instruction tuning) "
                            "on a JSONL data file.")
    p.add_argument("--stage", required=True, type=int, choices=STAGES)
    p.add_argument("--data", required=True, help="training JSONL (see flashsloth.data)")
    p.add_argument("--eval-data", help="held-out JSONL: loss and answer accuracy are logged")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="random-init preset (default tiny)")
    src.add_argument("--checkpoint", help="initial weights: a checkpoint directory (the original "
                                          "layout, e.g. stage 1's final/)")
    p.add_argument("--compression", choices=COMPRESSIONS, help="override the compression mode "
                                                               "(not on --resume)")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding it (default: the "
                                       "checkpoint's, else the data file's directory)")
    p.add_argument("--system", default=None, help="system prompt (default: the original's)")
    p.add_argument("--image-root", help="directory of relative image paths (default: the data "
                                        "file's directory)")
    p.add_argument("--max-length", type=INT_POS,
                   help="longest sequence with visual and query tokens (default and maximum: "
                        "the model's context)")
    p.add_argument("--on-bad", choices=("skip", "error"), default="skip",
                   help="bad data lines: skip and report them (default) or stop")
    p.add_argument("--check-images", choices=("header", "decode"), default="header",
                   help="at start, check each image's header (PIL verify, default) or decode it "
                        "fully; an image that fails to decode later is skipped and reported")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (its checkpoints, final "
                        "weights and logs) instead of refusing")
    p.add_argument("--epochs", type=FLOAT_POS, default=1.0)
    p.add_argument("--max-steps", type=INT_POS, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=INT_POS, default=16,
                   help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=INT_POS, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=FLOAT_POS, help="default: 1e-3 (stage 1), 2e-5 (stage 2)")
    p.add_argument("--weight-decay", type=FLOAT_NONNEG, default=0.0)
    p.add_argument("--warmup-ratio", type=FLOAT_RATIO, default=0.03)
    p.add_argument("--max-grad-norm", type=FLOAT_CLIP, default=1.0,
                   help="clip the gradient norm (0 or inf: no clipping)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 (fp16 without bf16) on GPU, fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--strategy", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="with torchrun: auto = fsdp for the 3.2B presets, ddp otherwise")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--save-every", type=INT_NONNEG, default=0,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--eval-every", type=INT_NONNEG, default=0,
                   help="evaluate every N steps (0: at the end only)")
    p.add_argument("--eval-batch-size", type=INT_POS, default=64)
    p.add_argument("--resume", help="a checkpoint directory, or 'latest' (the newest complete "
                                    "one in --output-dir)")
    p.add_argument("--log-every", type=INT_POS, default=10,
                   help="a plain log line every N steps (with --no-progress)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=INT_NONNEG, default=0,
                   help="DataLoader worker processes")
    p.add_argument("--cache-images", action="store_true",
                   help="keep preprocessed images in memory (small data sets)")
    p.add_argument("--threads", type=INT_POS, help="torch CPU threads per process")
    return p


def check_device(device: Optional[str]) -> Optional[str]:
    """--device: cpu, cuda or cuda:N, present on this machine (ValueError otherwise)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available on this machine "
                             "(use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has "
                             f"{torch.cuda.device_count()} GPU(s)")
    return device


def check_output_dir(path: str) -> None:
    """--output-dir must be a folder this process can write (created when missing)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir: {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"--output-dir: cannot write to {path!r} "
                         f"({exc.strerror or type(exc).__name__})") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from .checkpoints import CheckpointWriteError
    from .distributed import teardown_distributed
    from .loop import RunFinished, train

    try:
        summary = train(args)
    except RunFinished as done:
        if _env.torchrun_env()[1] == 0:
            print(str(done))
        return 0
    except CheckpointWriteError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (DataError, ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:              # e.g. the disk filled up while appending a log line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        teardown_distributed()
    if _env.torchrun_env()[1] == 0:
        ev = summary["eval"]
        extra = f", held-out loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.3f}" if ev else ""
        loss = summary["final_loss"]
        loss_text = f"final loss {loss:.4f}" if loss is not None else "no step run"
        print(f"done: {summary['step']} steps, {loss_text}{extra}; "
              f"weights in {os.path.join(summary['output_dir'], 'final')}")
    return 0
