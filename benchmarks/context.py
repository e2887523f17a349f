"""The context every result is recorded with: device, versions, git commit, date, config."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def device_label(device: torch.device) -> str:
    """Folder-safe device name: "cpu" or e.g. "nvidia-h100-80gb-hbm3".

    CPU labels start with "cpu" because benchmarks/results/cpu*/ is git-ignored: only GPU
    runs are committed.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"
    return device.type


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.multi_processor_count} SMs, "
                f"{props.total_memory / 2**30:.0f} GiB)")
    return (f"{_cpu_model()} ({os.cpu_count()} logical cores, "
            f"{torch.get_num_threads()} torch threads)")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", None)
    except Exception:
        return None


def collect(device: torch.device, config: Dict[str, object]) -> Dict[str, object]:
    """Everything needed to read a result file on its own, months later."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    ctx: Dict[str, object] = {
        "device": device_label(device),
        "device_type": device.type,
        "device_description": device_description(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "flashsloth_kernels": _version("flashsloth_kernels"),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        "config": config,
    }
    if device.type == "cuda":
        ctx["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        ctx["gpu_sms"] = props.multi_processor_count
        ctx["gpu_memory_bytes"] = props.total_memory
    return ctx
