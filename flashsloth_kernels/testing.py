"""Test helpers shared by tests/ and benchmarks/: one accuracy criterion, NaN-filled buffers.

The criterion (flash-attention's rule, made to scale with the computation)
--------------------------------------------------------------------------
A kernel result ``actual`` computed from inputs of dtype ``dtype`` is compared with

* ``expected``: the float64 reference (the oracle), and
* ``baseline``: the *same computation in plain PyTorch at the input precision* (the reference
  implementation run on the ``dtype`` inputs: fp32 accumulation, one rounding to ``dtype`` at the
  end, as the numeric contract prescribes; see docs/contract.md).

It passes when::

    max|actual - expected|  <=  k * max|baseline - expected|  +  floor
    floor = eps(dtype) * max|expected|                         (the one final rounding)
          + c * eps(acc) * (max|expected| + magnitude * sqrt(n))
                       (the accumulation, and the few operations in the accumulation dtype
                        around it: a softmax's division, an online softmax's rescaling)

``eps(acc)`` is the machine epsilon of the accumulation dtype (fp32 for fp16 / bf16 / fp32
inputs, float64 for float64), ``magnitude`` the size of one summed term of the computation
(e.g. max|x| for a convex combination of rows of x, max|dz| * max|x| for dz^T x) and ``n`` the
reduction length. The first term says "no worse than PyTorch itself at this precision" and
scales with the conditioning of the problem automatically (a quantity that cancels to ~0 in exact
arithmetic, like SAP's db2, has a baseline error of the size of its summed terms); the floor
covers the baseline being accurate by luck (few elements, exact sums) and differences in the
summation order between machines and instruction sets. K and C are fixed here, once, for
every test; no test passes its own tolerance.

Why not fixed floors: the error of a sum depends on the size of its terms and their number,
not on the size of the result. A fixed absolute floor (1e-5) was both too tight (SAP's db2 at
27x27 is ~1e-5 in fp32 on an AVX-512 machine, whose summation order differs) and, for small
results, too loose.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

# How many times the error of plain PyTorch at the input precision a kernel may have.
K = 4.0
# Constant of the accumulation floor c * eps(acc) * magnitude * sqrt(n).
C = 2.0

_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
        torch.float64: torch.float64}


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16 / bf16 / fp32 inputs, float64 for float64 (the contract's rule)."""
    return _ACC[dtype]


def term_size(*factors: Union[torch.Tensor, float, None]) -> float:
    """Size of one summed term: the product of max|factor| (tensors) and plain numbers."""
    m = 1.0
    for f in factors:
        if f is None:
            continue
        if isinstance(f, torch.Tensor):
            m *= float(f.detach().abs().max().item()) if f.numel() else 0.0
        else:
            m *= abs(float(f))
    return m


def tolerance(expected: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, *,
              magnitude: float = 0.0, n: int = 1, k: float = K) -> float:
    """The bound on max|actual - expected| (see the module docstring)."""
    e = expected.detach().to(torch.float64)
    b = baseline.detach().to(torch.float64)
    if e.numel() == 0:
        return 0.0
    base_err = float((b - e).abs().max().item())
    top = float(e.abs().max().item())
    floor = eps(dtype) * top \
        + C * eps(accumulation_dtype(dtype)) * (top + float(magnitude) * math.sqrt(max(1, n)))
    return k * base_err + floor


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor,
                 baseline: Union[torch.Tensor, Callable[[], torch.Tensor]],
                 dtype: Optional[torch.dtype] = None, *, magnitude: float = 0.0, n: int = 1,
                 k: float = K) -> None:
    """Assert that ``actual`` is as accurate as plain PyTorch at the input precision.

    ``expected`` is the float64 reference, ``baseline`` the same computation in plain PyTorch at
    the input precision (a tensor, or a callable returning it); ``dtype`` the dtype of the inputs
    the kernel ran on (default: ``actual``'s); ``magnitude`` the size of one summed term and
    ``n`` the reduction length (see the module docstring). Non-finite values where the
    reference is finite fail; the message names the tensor, the error, the bound and its parts,
    and the worst element.
    """
    dtype = actual.dtype if dtype is None else dtype
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return
    if callable(baseline):
        baseline = baseline()
    if baseline.shape != expected.shape:
        raise AssertionError(
            f"{name}: baseline shape {tuple(baseline.shape)} != {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not bool(torch.isfinite(e).all()):
        raise AssertionError(
            f"{name}: the reference is not finite; compare isfinite patterns instead")
    finite = torch.isfinite(a)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int((~finite).sum())} non-finite values (first at {bad})")
    diff = (a - e).abs()
    err = float(diff.max().item())
    bound = tolerance(e, baseline, dtype, magnitude=magnitude, n=n, k=k)
    if not err <= bound:
        base_err = float((baseline.detach().to(torch.float64) - e).abs().max().item())
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: max |error| {err:.3e} > bound {bound:.3e} ({dtype}): {k:g} x plain-PyTorch "
            f"error {base_err:.3e} + floor {bound - k * base_err:.3e} (magnitude {magnitude:.3g}, "
            f"n {n}); worst at {where}: got {actual[where].item():.9g}, expected "
            f"{expected[where].item():.9g}"
        )


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (for reports and benchmarks, not for pass/fail)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh buffer of t's shape filled with NaN, so unwritten outputs fail comparisons."""
    return torch.full_like(t, float("nan"))
