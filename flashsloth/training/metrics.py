"""Rank 0's logs: metrics.jsonl (one JSON object per step and per evaluation), the loss
curve, the progress bar or plain log lines."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional


class MetricsLog:
    """metrics.jsonl of rank 0: one JSON object per line. ``resume_at(step)`` drops the lines
    past a checkpoint's step (and a line torn by a kill), so a resumed run continues one
    curve; the file is rewritten atomically (temporary file, then rename)."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def resume_at(self, step: int) -> None:
        if not self.path or not os.path.isfile(self.path):
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        from .checkpoints import atomic_write_text

        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: Dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> List[dict]:
    """The rows of a metrics.jsonl; a line that is not JSON (torn by a kill mid-write) is
    left out."""
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


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


class Progress:
    """Rank 0's progress: a rich bar with loss and throughput, or (``bar=False``, or without
    rich) a plain line every ``log_every`` steps. Other ranks print nothing."""

    def __init__(self, total: int, start: int, main: bool, bar: bool, log_every: int):
        self.log_every = max(1, log_every)
        self.main = main
        self.bar = None
        if main and bar:
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
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

