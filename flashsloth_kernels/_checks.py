"""Input validation shared by the public functions.

Every check runs before any kernel and raises TypeError (wrong kind of object or
dtype) or ValueError (wrong shape or value) naming the argument, what it got and
what was expected. Never ``assert``: it vanishes under ``python -O``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, *, ndim: Sequence[int] | int | None = None, optional: bool = False,
           floating: bool = True) -> Optional[torch.Tensor]:
    """Check that ``t`` is a tensor (or None when ``optional``) of an allowed rank."""
    if t is None:
        if optional:
            return None
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )
    return t


def same_dtype_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """Every tensor in ``others`` must share ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(
                f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}"
            )
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), "
                            f"got {t.dtype}")


def shape(name: str, t: torch.Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    """Check ``t.shape`` against ``expected`` (None matches any size)."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected,
                                                                            strict=False))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        extra = f" {what}" if what else ""
        raise ValueError(f"{name}: expected shape {want}{extra}, got {tuple(t.shape)}")


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} ({v!r})")
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")
    return v


def int_pair(name: str, v) -> Tuple[int, int]:
    """An int or a pair of ints, each >= 1."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name}: expected an int or a pair (a, b), got {tuple(v)!r}")
        return positive_int(f"{name}[0]", v[0]), positive_int(f"{name}[1]", v[1])
    if isinstance(v, torch.Size) or isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int or a pair of ints, "
                        f"got {type(v).__name__} ({v!r})")
    positive_int(name, v)
    return v, v


def probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{name}: expected a float in [0, 1), got {p}")
    return p


# The documented range of the attention logit scale (docs/contract.md): beyond it the logits
# of any realistic q, k overflow fp32 and every output would be NaN.
MAX_SCALE = 1e4


def attention_scale(name: str, scale, head_dim: int) -> float:
    """``scale`` of the attention logits: None (-> head_dim ** -0.5) or a finite float with
    0 < scale <= MAX_SCALE."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: expected a float > 0 or None, got {type(scale).__name__}")
    value = float(scale)
    if not (math.isfinite(value) and 0.0 < value <= MAX_SCALE):
        raise ValueError(f"{name}: expected a finite float in (0, {MAX_SCALE:g}], got {value}")
    return value
