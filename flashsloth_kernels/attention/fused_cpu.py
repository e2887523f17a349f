"""Host functions of the C++ CPU backend of the query-to-patch attention.

The kernels live in csrc/attention/attention_cpu.cpp (+ attention_cpu_kernels.h) and register
as the CPU kernels of ``torch.ops.flashsloth.query_patch_attention_fwd`` / ``_bwd`` when
``flashsloth_kernels.attention._C`` is imported.

Design (EmbQ: 9 queries x 32 heads against 729 keys, head dims 18 / 36): one parallel task per
(b, h), plus a key split with a merge when B * H is small, handed to the threads dynamically
(csrc/common/cpu_parallel.h). Keys stream in chunks (256 keys on AVX-512, 64 on AVX2) with an
online softmax (exp2 polynomial, fp32; masked keys are skipped, never read). When the queries
fill enough of their vectors (more than half on AVX-512: Lq = 9; at least 7 / 8 on AVX2: Lq =
7, 8, 14-16) the scores and the softmax keep the queries in the lanes (K rows read in place,
8 keys per group so that 8 FMA chains are in flight; on AVX-512 a unit of 8k + 1 queries as
blocks of 8 in 256-bit lanes and its last query by dot products) and P x V keeps the value
dims in the lanes with all 9 queries x 3 value vectors in registers (the 4-dim tail of Dv = 36
with 8 of the queries in 256-bit lanes instead: a 128-bit FMA costs a 256-bit one's pipe slot
on Zen 4); otherwise (Lq = 1, 2;
Lq = 9 on AVX2) the keys go in the lanes (K transposed in registers; a single query on AVX-512
takes dot products over head dims instead, K rows read in place). When the call's K and V
exceed a quarter of the last-level cache (:func:`prefetch_min_bytes`), rows 192 keys ahead are
prefetched in software: K during the scores, V during P x V, one row per key: at B = 16 that
took the forward to ~65-70% of the read bandwidth on AMD Zen 4; below it (B = 1: K and V likely
still in cache) the prefetches only cost (B = 1 Lq = 1 ~20% slower with them on Zen 4). The
kernels are compiled for AVX-512 (twice: with AVX512-BF16, whose vdpbf16ps computes the bf16
forward's query-lane scores straight from the bf16 K rows, ~13% faster at B = 16 on AMD Zen 4,
and without), AVX2 and the baseline instruction set and picked at first use
(:func:`isa`). The backward (query lanes, 8 keys per group, the same prefetch) recomputes the
probabilities from lse, accumulates in fp32 (dq summed per chunk, then across chunks) and is
deterministic (no atomics; the split depends on the shape, not the thread count).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _ext

Tensor = torch.Tensor

_ops = _ext.cpu_ops("flashsloth_kernels.attention._C")
# the ops' overloads, bound once: calling them directly skips the overload packet's lookup
# (~1.6 us a call)
_fwd_kernel = _ops.query_patch_attention_fwd.default
_bwd_kernel = _ops.query_patch_attention_bwd.default
_isa = _ext.IsaSwitch("flashsloth_kernels.attention._C", "query_patch_attention")


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
             scale: float) -> Tuple[Tensor, Tensor]:
    """Forward. q: (B, H, Lq, Dk), k: (B, H, Lk, Dk), v: (B, H, Lk, Dv), any strides, one dtype
    (float32 / float64 / float16 / bfloat16); key_padding_mask: (B, Lk) bool (True = attend) or
    None. Returns out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 (float64 for
    float64 inputs), +inf where every key of the row is masked (out is 0 there)."""
    _isa.apply()
    return _fwd_kernel(q, k, v, key_padding_mask, float(scale))


def attn_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
             key_padding_mask: Optional[Tensor], scale: float, out: Tensor,
             lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward from the saved (out, lse). grad_out: (B, H, Lq, Dv) in q's dtype.
    Returns (dq, dk, dv) in the inputs' dtype, accumulated in fp32 (float64 for float64)."""
    _isa.apply()
    return _bwd_kernel(grad_out, q, k, v, key_padding_mask, float(scale), out, lse)


def pool_stats() -> dict:
    """Bytes of the C++ CPU kernels' output pool (csrc/common/cpu_pool.h): ``live``, ``idle``
    (released buffers kept for the next call of the same size) and ``limit``
    (FLASHSLOTH_CPU_POOL_MB)."""
    return _isa.pool_stats()


def isa() -> str:
    """The instruction set the kernels run with: "avx512bf16", "avx512", "avx2" or "baseline"
    (the widest this CPU supports, or the one FLASHSLOTH_CPU_ISA forces)."""
    return _isa.current()


def supported_isas() -> Tuple[str, ...]:
    """The variants compiled in that this CPU can run, widest first."""
    return _isa.supported()


def prefetch_min_bytes() -> int:
    """Bytes of K and V above which the forward and the backward prefetch their rows ahead in
    software (by default a quarter of this machine's last-level cache, csrc/common/cpu_cache.h;
    the measurements are in csrc/attention/attention_cpu.cpp)."""
    return int(_ops.query_patch_attention_prefetch_min_bytes())


def set_prefetch_min_bytes(n: Optional[int]) -> int:
    """Set the threshold of :func:`prefetch_min_bytes` (0: always prefetch; None: the default
    again) and return the previous value. Results never depend on it: prefetches are hints."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise TypeError(f"n: expected an int >= 0 or None, got {type(n).__name__} {n!r}")
    if n is not None and n < 0:
        raise ValueError(f"n: expected an int >= 0 or None, got {n}")
    return int(_ops.query_patch_attention_set_prefetch_min_bytes(-1 if n is None else n))
