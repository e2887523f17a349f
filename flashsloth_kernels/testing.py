"""Test helpers shared by tests/ and benchmarks/: tolerances and NaN-filled buffers.

Errors are measured as ||actual - expected|| / ||expected|| against a float64 reference
(an RMS-relative error, robust to single tiny reference elements), plus a NaN/inf check.
The bounds are per dtype of the *inputs* the kernel ran on, measured as in
../shared/guides/kernels.md: fp32 well under 1e-4, 16-bit operands 1e-3 to 1e-2.
"""

from __future__ import annotations

import torch

# dtype of the computation under test -> max relative (norm-wise) error
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

# absolute floor for tensors whose exact value is ~0 (e.g. SAP's db2: the window softmax is
# shift-invariant, so the bias of the scores gets a zero gradient up to rounding)
ABS_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype`` (times ``scale``).

    Passes when the norm-wise relative error is within REL_TOL[dtype] * scale, or when every
    element is within ABS_TOL[dtype] * scale (for tensors that are ~0 exactly). On failure the
    message says which tensor, the relative error against its bound and where the largest
    absolute difference sits.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected "
                             f"{tuple(expected.shape)}")
    if actual.numel() == 0:
        return
    finite = torch.isfinite(actual.detach().to(torch.float64))
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int((~finite).sum())} non-finite values (first at {bad})")
    tol = REL_TOL[dtype] * scale
    err = rel_error(actual, expected)
    diff = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    if not (err <= tol or diff.max().item() <= ABS_TOL[dtype] * scale):
        idx = torch.unravel_index(diff.argmax(), diff.shape)
        where = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype}); "
            f"max |diff| {diff.max().item():.3e} "
            f"at {where}: got {actual[where].item():.6g}, expected {expected[where].item():.6g}"
        )


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh buffer of t's shape filled with NaN, so unwritten outputs fail comparisons."""
    return torch.full_like(t, float("nan"))
