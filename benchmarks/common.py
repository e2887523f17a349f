"""What every section shares: the run configuration, cases and result rows.

A section turns the configuration into a list of :class:`Case` objects (the progress bar
counts them); running a case returns result rows, plain dicts that go unchanged into the
JSON, CSV and Markdown outputs. A row always has ``section``, ``case``, ``provider``,
``mode`` and ``status`` ("ok", "error", "not available" or "skipped", with ``note`` saying
why when not "ok"); the other keys depend on the section.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .ceilings import Ceilings
from .timing import Budget, Timing, _short

Row = Dict[str, object]


@dataclass
class RunConfig:
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    presets: Optional[List[str]] = None  # None: the section's default for this device
    # compression modes the model section times (None: every mode); counts cover every mode
    compressions: Optional[List[str]] = None
    budget: Budget = field(default_factory=Budget)
    ceilings: Optional[Ceilings] = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Case:
    """One unit of work of a section, named for the progress bar."""

    section: str
    name: str
    run: Callable[[], List[Row]]


def status_row(section: str, case: str, status: str, note: str, **extra) -> Row:
    row: Row = {"section": section, "case": case, "provider": extra.pop("provider", "-"),
                "mode": extra.pop("mode", "-"), "status": status, "note": note}
    row.update(extra)
    return row


def error_row(section: str, case: str, exc: BaseException, **extra) -> Row:
    return status_row(section, case, "error", f"{type(exc).__name__}: {_short(str(exc))}", **extra)


def timing_fields(t: Timing) -> Row:
    return {"median_ms": t.median_ms, "q25_ms": t.q25_ms, "q75_ms": t.q75_ms,
            "spread_pct": t.spread_pct, "samples": t.samples, "inner": t.inner}


def free_memory(device: torch.device) -> None:
    """Drop what the previous case left behind, so peak-memory numbers do not leak across."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dtype_from_name(name: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "float64": torch.float64, "fp64": torch.float64}
    key = name.strip().lower()
    if key not in names:
        raise ValueError(f"--dtype: expected one of float32, bfloat16, float16, float64, "
                         f"got {name!r}")
    return names[key]
