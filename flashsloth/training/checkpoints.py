"""Resumable training checkpoints that survive a kill at any instant.

A checkpoint ``<out>/checkpoint-0000100/`` holds::

    config.json, model.safetensors     the weights in the original layout (from_pretrained)
    optimizer.pt                       AdamW state keyed by parameter name
    trainer_state.pt / .json           step, data position, schedule, fp16 scaler, run settings
    rng_state_<rank>.pt                each process's RNG (dropout replays exactly)
    complete.json                      the completion marker: every other file and its size

How it is written (every process calls :func:`save_checkpoint`):

1. everything, the marker last, goes into a temporary folder beside the final one
   (``<out>/.checkpoint-0000100.partial``), each file flushed to disk (fsync);
2. the folder is renamed into place. Replacing an existing checkpoint (a resumed run that
   reaches a step it had saved before) is a swap: the old folder is renamed aside
   (``.checkpoint-0000100.replaced``), the new one renamed in, then the old one removed;
   the old folder is never written into.

So at any instant ``checkpoint-N`` is either absent, the previous complete copy, or the new
complete copy. :func:`clean_leftovers` (run before a run writes anything) removes the
temporary folders of killed writes and puts a swapped-aside copy back when the kill fell
between the two renames. :func:`latest_checkpoint` picks only complete checkpoints (marker
present, every file it lists present with its size); :func:`checkpoint_problems` says what
an incomplete one lacks. ``final/`` is written the same way (:func:`save_final`).

A write that fails (disk full, permissions) removes its temporary folder and raises
:class:`CheckpointWriteError` naming the path and, for a full disk, the space needed; the
previous checkpoint is untouched.

Fault injection: :func:`_fault_point` is called between every two write steps; with
``FLASHSLOTH_TEST_KILL_AT_WRITE=N`` (read in flashsloth_kernels._env) the process kills
itself with SIGKILL at the N-th one (counted from the process start). The tests use it to
prove that ``--resume latest`` after a kill anywhere matches an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from flashsloth_kernels import _env

from ..config import FlashSlothConfig
from .distributed import (
    dist_ready,
    full_model_state,
    optimizer_state,
    rank,
    unwrap,
    world_size,
)

Tensor = torch.Tensor

MARKER = "complete.json"
PARTIAL = ".partial"          # .<name>.partial: a folder being written
REPLACED = ".replaced"        # .<name>.replaced: the previous copy during a swap
TMP_FILE = ".tmp-"            # .<file>.tmp-<pid>: a file being written atomically
CHECKPOINT_PREFIX = "checkpoint-"
FORMAT = 1


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous checkpoint
    is intact and the temporary folder removed."""


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder lacks a part (its write was interrupted, or files were removed)."""


# ---------------------------------------------------------------------------- fault injection
_fault_count = 0


def _fault_point(label: str) -> None:
    """Called between every two steps of a checkpoint write (``label`` says where). With
    FLASHSLOTH_TEST_KILL_AT_WRITE=N the N-th call of the process SIGKILLs it."""
    global _fault_count
    _fault_count += 1
    n = _env.kill_at_write_step()
    if n and _fault_count == n:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- file helpers
def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write a small text file under a temporary name beside it, fsync, rename into place."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}{TMP_FILE}{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(folder, directory=True)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _torch_save(obj: Any, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _free_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free


def _looks_like_full_disk(exc: BaseException, needed: int, folder: str) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left" in text or "StorageFull" in text or "os error 28" in text:
        return True
    try:      # torch.save's "unexpected pos" and safetensors' I/O errors hide the errno
        return _free_bytes(folder) < needed
    except OSError:
        return False


# ---------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Where a run is: optimizer steps done, the epoch, micro-batches of it consumed."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    samples: int = 0
    tokens: int = 0
    elapsed: float = 0.0


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StateView:
    """What checkpoint.save_pretrained reads from a model, around a full state dict (FSDP
    models are sharded: the state dict is gathered first)."""

    def __init__(self, state: Dict[str, Tensor], config: FlashSlothConfig):
        self._state = state
        self.config = config
        self.dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)

    def state_dict(self):
        return self._state


# ---------------------------------------------------------------------------- reading
def checkpoint_step(path: str) -> Optional[int]:
    """N of a ``checkpoint-N`` folder name (None for any other name)."""
    name = os.path.basename(os.path.normpath(path))
    tail = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(tail) if tail.isdigit() else None


def checkpoint_problems(path: str) -> List[str]:
    """What a checkpoint (or final/) folder lacks; empty when it is complete."""
    if not os.path.isdir(path):
        return ["the folder itself (it does not exist)"]
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        present = sorted(os.listdir(path))
        listing = ", ".join(present) if present else "nothing"
        return [f"{MARKER}, the completion marker: its write did not finish (present: "
                f"{listing})"]
    try:
        with open(marker) as fh:
            files = json.load(fh)["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError) as exc:
        return [f"a readable {MARKER} ({type(exc).__name__})"]
    problems = []
    for name, size in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{name} (missing)")
        elif os.path.getsize(file) != size:
            problems.append(f"{name} ({os.path.getsize(file)} bytes, the marker says {size})")
    return problems


def is_complete(path: str) -> bool:
    return not checkpoint_problems(path)


def list_checkpoints(output_dir: str) -> List[tuple]:
    """(N, path) of every ``checkpoint-N`` folder, complete or not, by N."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for entry in os.listdir(output_dir):
        n = checkpoint_step(entry)
        path = os.path.join(output_dir, entry)
        if n is not None and os.path.isdir(path):
            found.append((n, path))
    return sorted(found)


def latest_checkpoint(output_dir: str, on_skip: Optional[Callable[[str, List[str]], None]] = None
                      ) -> Optional[str]:
    """The complete ``checkpoint-N`` folder with the largest N (None if none). Incomplete ones
    are passed over (``on_skip(path, problems)`` is told about each)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        if on_skip is not None:
            on_skip(path, problems)
    return None


def require_complete(path: str, what: str = "--resume") -> None:
    problems = checkpoint_problems(path)
    if problems:
        raise IncompleteCheckpointError(
            f"{what}: {path!r} is not a complete checkpoint; it lacks {'; '.join(problems)}. "
            "Resume from an earlier checkpoint, or pass --resume latest (it takes the newest "
            "complete one)")


def load_checkpoint(path: str, rank_: int = 0) -> Dict[str, Any]:
    """A complete checkpoint's training state: {"json": trainer_state.json, "extra":
    trainer_state.pt, "optimizer": optimizer.pt, "rng": this rank's RNG state}."""
    require_complete(path)
    with open(os.path.join(path, "trainer_state.json")) as fh:
        saved = json.load(fh)
    rng_file = os.path.join(path, f"rng_state_{rank_}.pt")
    if not os.path.isfile(rng_file):
        raise IncompleteCheckpointError(
            f"--resume: {path!r} has no {os.path.basename(rng_file)}: it was written by "
            f"{saved.get('run', {}).get('world_size', '?')} process(es); resume with as many")
    return {"json": saved,
            "extra": torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True),
            "optimizer": torch.load(os.path.join(path, "optimizer.pt"), weights_only=True),
            "rng": torch.load(rng_file, weights_only=True)}


def load_model_state(model: nn.Module, path: str) -> None:
    """Fill an (unwrapped) FlashSloth with a checkpoint directory's weights, strictly."""
    from ..checkpoint import (
        check_keys,
        from_original_key,
        iter_tensors,
        tensor_shapes,
        to_original_key,
        weight_files,
    )

    files = weight_files(path)
    expected = {to_original_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, tensor_shapes(files), model.config, path)
    state = {}
    for key, value in iter_tensors(files):
        if key in expected:
            state[from_original_key(key)] = value
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------- cleaning
def clean_leftovers(output_dir: str) -> List[str]:
    """Undo what killed writes left in ``output_dir`` (call on rank 0 before writing):
    temporary folders and files are removed; a checkpoint swapped aside whose replacement
    never arrived is put back. Returns what was done, one line per item."""
    done: List[str] = []
    if not os.path.isdir(output_dir):
        return done
    entries = sorted(os.listdir(output_dir))
    for entry in entries:                       # first put swapped-aside copies back
        if entry.startswith(".") and entry.endswith(REPLACED):
            old = os.path.join(output_dir, entry)
            final = os.path.join(output_dir, entry[1:-len(REPLACED)])
            if not os.path.exists(final):
                os.rename(old, final)
                done.append(f"restored {final} (a kill fell inside its replacement)")
            else:
                shutil.rmtree(old)
                done.append(f"removed {old} (the replaced copy)")
    for entry in entries:
        path = os.path.join(output_dir, entry)
        if entry.startswith(".") and entry.endswith(PARTIAL) and os.path.isdir(path):
            shutil.rmtree(path)
            done.append(f"removed {path} (an interrupted write)")
        elif entry.startswith(".") and TMP_FILE in entry and os.path.isfile(path):
            os.remove(path)
            done.append(f"removed {path} (an interrupted write)")
    if done:
        _fsync_path(output_dir, directory=True)
    return done


# ---------------------------------------------------------------------------- writing
def _partial(path: str) -> str:
    folder, name = os.path.split(os.path.normpath(path))
    return os.path.join(folder, f".{name}{PARTIAL}")


def _begin(path: str) -> str:
    tmp = _partial(path)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    _fault_point(f"{os.path.basename(path)}: before")
    os.makedirs(tmp)
    return tmp


def _finish(tmp: str, path: str, extra: Optional[dict] = None) -> None:
    """Marker last, fsync, then rename (or swap) the temporary folder into place."""
    name = os.path.basename(os.path.normpath(path))
    files = {}
    for entry in sorted(os.listdir(tmp)):
        file = os.path.join(tmp, entry)
        _fsync_path(file)
        files[entry] = os.path.getsize(file)
    _write_json(os.path.join(tmp, MARKER), {"format": FORMAT, "files": files, **(extra or {})})
    _fsync_path(tmp, directory=True)
    _fault_point(f"{name}: marker written")
    folder = os.path.dirname(os.path.normpath(path))
    if os.path.exists(path):
        old = os.path.join(folder, f".{name}{REPLACED}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(path, old)
        _fault_point(f"{name}: previous copy set aside")
        os.rename(tmp, path)
        _fsync_path(folder, directory=True)
        _fault_point(f"{name}: renamed into place (swap)")
        shutil.rmtree(old)
        _fault_point(f"{name}: previous copy removed")
    else:
        os.rename(tmp, path)
        _fsync_path(folder, directory=True)
        _fault_point(f"{name}: renamed into place")


def _write_error(path: str, exc: BaseException, needed: int, what: str) -> CheckpointWriteError:
    folder = os.path.dirname(os.path.normpath(path)) or "."
    shutil.rmtree(_partial(path), ignore_errors=True)
    previous = latest_checkpoint(folder)
    kept = (f"the previous checkpoint {previous} is intact" if previous
            else "no earlier checkpoint exists")
    if _looks_like_full_disk(exc, needed, folder):
        try:
            free = _human(_free_bytes(folder))
        except OSError:
            free = "unknown"
        return CheckpointWriteError(
            errno.ENOSPC, f"no space left on the device to write {what} {path}: it needs about "
                          f"{_human(needed)}, {free} is free there; {kept}")
    return CheckpointWriteError(
        getattr(exc, "errno", None) or errno.EIO,
        f"cannot write {what} {path} ({type(exc).__name__}: {exc}); {kept}")


def _check_space(path: str, needed: int, what: str) -> None:
    folder = os.path.dirname(os.path.normpath(path)) or "."
    free = _free_bytes(folder)
    if free < needed:
        raise _write_error(path, OSError(errno.ENOSPC, "No space left on device"), needed, what)


def _all_ok(ok: bool, device: torch.device) -> bool:
    """True on every process when every process's ``ok`` is (a collective when distributed)."""
    if not dist_ready():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def save_checkpoint(path: str, model: nn.Module, optimizer, scheduler, scaler,
                    state: TrainState, run: Dict[str, Any]) -> None:
    """Write a resumable checkpoint folder atomically (see the module docstring). Every
    process must call it (FSDP gathers; each process writes its RNG state); rank 0 writes
    the rest. Raises CheckpointWriteError on every process when any of them failed."""
    from ..checkpoint import save_pretrained

    r, device = rank(), unwrap(model).device
    model_state = full_model_state(model)
    optim_state = optimizer_state(model, optimizer)
    needed = _tensor_bytes(model_state) + _tensor_bytes(optim_state) + (1 << 20)
    error: Optional[BaseException] = None
    tmp = _partial(path)
    if r == 0:
        try:
            _check_space(path, needed, "the checkpoint")
            tmp = _begin(path)
            save_pretrained(StateView(model_state, unwrap(model).config), tmp)
            _fault_point(f"{os.path.basename(path)}: weights written")
            _torch_save(optim_state, os.path.join(tmp, "optimizer.pt"))
            _fault_point(f"{os.path.basename(path)}: optimizer.pt written")
            _torch_save({"scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "state": asdict(state)}, os.path.join(tmp, "trainer_state.pt"))
            _fault_point(f"{os.path.basename(path)}: trainer_state.pt written")
            _write_json(os.path.join(tmp, "trainer_state.json"), {**asdict(state), "run": run})
            _fault_point(f"{os.path.basename(path)}: trainer_state.json written")
        except CheckpointWriteError as exc:
            error = exc
        except Exception as exc:
            error = _write_error(path, exc, needed, "the checkpoint")
    if _all_ok(error is None, device):       # the folder exists before others write to it
        try:
            _torch_save(rng_state(), os.path.join(tmp, f"rng_state_{r}.pt"))
            _fault_point(f"{os.path.basename(path)}: rng_state_{r}.pt written")
        except Exception as exc:
            error = _write_error(path, exc, needed, "the checkpoint")
        if _all_ok(error is None, device) and r == 0:
            try:
                _finish(tmp, path, {"step": state.step, "world_size": world_size()})
            except Exception as exc:
                error = _write_error(path, exc, needed, "the checkpoint")
        ok = _all_ok(error is None, device)
    else:
        ok = False
    if not ok:
        if r == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error if error is not None else CheckpointWriteError(
            errno.EIO, f"cannot write the checkpoint {path}: another process failed (see its "
                       "message)")


def save_final(path: str, model_state: Dict[str, Tensor], config: FlashSlothConfig,
               tokenizer_file: Optional[str] = None) -> None:
    """Write ``final/`` (weights, config, tokenizer.json) atomically, like a checkpoint
    (rank 0 only; the caller gathered ``model_state``)."""
    from ..checkpoint import save_pretrained

    needed = _tensor_bytes(model_state) + (1 << 20)
    try:
        _check_space(path, needed, "the final weights")
        tmp = _begin(path)
        save_pretrained(StateView(model_state, config), tmp)
        _fault_point("final: weights written")
        if tokenizer_file and os.path.isfile(tokenizer_file):
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
            _fault_point("final: tokenizer.json written")
        _finish(tmp, path)
    except CheckpointWriteError:
        raise
    except Exception as exc:
        raise _write_error(path, exc, needed, "the final weights") from exc
