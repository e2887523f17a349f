"""Device ceilings measured in the same run: a large copy and a large read-only reduction
(GB/s), and a large matmul (GFLOP/s).

Ops are judged against these rather than against datasheet numbers: a memory-bound op
against the bandwidth (the read bandwidth for an op that mostly reads, like attention with
few queries: its output is ~1% of its bytes), a compute-bound one against the matmul rate,
all measured by the same timer, in the same interleaved rounds, on the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .flops import count_flops
from .timing import Budget, Timing, time_providers


@dataclass
class Ceilings:
    copy_gbps: float
    copy_bytes: int
    matmul_gflops: float
    matmul_n: int
    matmul_dtype: str
    copy_timing: Timing
    matmul_timing: Timing
    read_gbps: float = 0.0
    read_timing: Optional[Timing] = None

    def as_dict(self) -> Dict[str, object]:
        return {
            "copy_gbps": self.copy_gbps,
            "copy_bytes": self.copy_bytes,
            "copy_median_ms": self.copy_timing.median_ms,
            "read_gbps": self.read_gbps,
            "read_median_ms": self.read_timing.median_ms if self.read_timing else None,
            "matmul_gflops": self.matmul_gflops,
            "matmul_n": self.matmul_n,
            "matmul_dtype": self.matmul_dtype,
            "matmul_median_ms": self.matmul_timing.median_ms,
        }


def measure(device: torch.device, dtype: torch.dtype, quick: bool = False) -> Ceilings:
    """Copy: dst.copy_(src) on a buffer far larger than the last-level cache (read + write
    bytes counted). Read: src.sum() over the same buffer (read bytes only; the reduction's
    arithmetic is far below the memory time). Matmul: an n x n by n x n product in ``dtype``
    (FLOPs from the counter). The three are timed in the same interleaved rounds."""
    if device.type == "cuda":
        copy_bytes, n = 1 << 30, 8192
    else:
        copy_bytes, n = (128 << 20) if quick else (256 << 20), 2048
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    budget = Budget(min_rounds=3 if quick else 5, max_rounds=10, seconds=1.0 if quick else 2.0,
                    warmup=2)
    timings, errors = time_providers({"copy": lambda: dst.copy_(src), "read": lambda: src.sum(),
                                      "matmul": lambda: a @ b}, device, budget)
    if errors:
        raise RuntimeError(f"measuring the device ceilings failed: {errors}")
    copy_t, read_t, mm_t = timings["copy"], timings["read"], timings["matmul"]
    am, bm = a.to("meta"), b.to("meta")
    mm_flops = count_flops(lambda: am @ bm)
    return Ceilings(
        copy_gbps=2 * copy_bytes / (copy_t.median_ms * 1e-3) / 1e9,
        copy_bytes=copy_bytes,
        matmul_gflops=mm_flops / (mm_t.median_ms * 1e-3) / 1e9,
        matmul_n=n,
        matmul_dtype=str(dtype).replace("torch.", ""),
        copy_timing=copy_t,
        matmul_timing=mm_t,
        read_gbps=copy_bytes / (read_t.median_ms * 1e-3) / 1e9,
        read_timing=read_t,
    )
