"""Distributed set-up: joining torchrun's process group, DDP / FSDP2 wrapping, and the
collective state-dict helpers the checkpoints use (FSDP gathers full state dicts)."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from flashsloth_kernels import _env

Tensor = torch.Tensor

# FSDP2 warns when a wrapped module returns a view (the root returns a logits slice); the
# trainer never modifies outputs in place, which is what the warning is about.
_FSDP_VIEW_WARNING = r"FSDP2-wrapped module .* returned a view"


def dist_ready() -> bool:
    """torch.distributed is available and a process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if dist_ready() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if dist_ready() else 1


def barrier() -> None:
    if dist_ready():
        torch.distributed.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The FlashSloth inside a DistributedDataParallel wrapper (FSDP2 shards in place)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def fsdp_forward_warnings(model: nn.Module):
    """A context for one forward of ``model``: under FSDP2 it silences (only) the "returned a
    view" warning, and only inside the context; a no-op otherwise."""
    if not is_fsdp(model):
        return contextlib.nullcontext()
    ctx = warnings.catch_warnings()

    @contextlib.contextmanager
    def scoped():
        with ctx:
            warnings.filterwarnings("ignore", message=_FSDP_VIEW_WARNING)
            yield

    return scoped()


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.
    A single process (no torchrun) gets world size 1 and no process group. Pair it with
    :func:`teardown_distributed`."""
    world, rank_, local = _env.torchrun_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist_ready():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank_, world, local, dev)


def teardown_distributed() -> None:
    """Destroy the process group (if any): every rank calls it once, after the last
    collective and after the objects that hold the group (DDP, FSDP) are released."""
    if dist_ready():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """End a distributed worker process (after :func:`teardown_distributed`) without running
    the interpreter's finalization.

    Why: a ProcessGroupGloo that DistributedDataParallel was built on stays alive in C++ after
    ``destroy_process_group`` (nothing in Python holds it, ``shutdown()`` / ``abort()`` do not
    stop it: tests/test_train_ddp.py's docstring has the evidence), so its worker threads
    are never joined. When one of them drops the last reference to a finished collective
    while the interpreter is finalizing, the decref takes the GIL, CPython ends the thread
    inside a noexcept C++ destructor and libstdc++ aborts the process ("terminate called
    without an active exception", SIGABRT) although the run succeeded. With every file
    closed and the group destroyed there is nothing left for finalization to do, so the
    process ends here: stdout/stderr are flushed, then ``os._exit``.
    """
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


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
        for layer in list(model.vision_tower.encoder.layers) + list(model.language_model.layers):
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"strategy: expected 'ddp', 'fsdp' or 'none', got {strategy!r}")


# ---------------------------------------------------------------------------- state dicts
def full_model_state(model: nn.Module) -> Dict[str, Tensor]:
    """Every process must call this under FSDP (it gathers); rank 0 gets the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist_ready() and is_fsdp(model):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer state keyed by parameter name (gathered in full under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if dist_ready() and is_fsdp(model):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    else:
        opts = StateDictOptions()
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True) if (dist_ready() and is_fsdp(model)) \
        else StateDictOptions()
    set_optimizer_state_dict(model, optimizer, state, options=opts)
