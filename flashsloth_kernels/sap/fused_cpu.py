"""Host functions of the fused C++ CPU backend of spatial attention pooling.

The kernels live in csrc/sap/sap_cpu.cpp and register as the CPU kernels of
``torch.ops.flashsloth.spatial_attention_pool_fwd`` / ``_bwd`` (schemas and fakes in op.py) when
``flashsloth_kernels.sap._C`` is imported. Design: the scorer's first
Linear runs as one MKL/oneDNN GEMM (x W1^T, b1 added in the epilogue); everything else (bias,
ReLU, dropout mask, dot with w2, window softmax, weighted sum) is one fused parallel pass over
the windows. The backward recomputes that GEMM instead of saving the (B, N, Ch) activations,
fuses the softmax and activation backward into one pass, and hands dW1 and dx to two GEMMs.
(Measured on a 2-core CPU: running the GEMM per strip of windows, so that z stays in cache, was
7-25% slower than one big GEMM plus the pass, so the op does the latter.) The two passes are
compiled for AVX-512 (also run under the name avx512bf16: SAP has no AVX512-BF16 code), AVX2
and the baseline instruction set, like the attention kernels
(:func:`isa`, FLASHSLOTH_CPU_ISA); built for the baseline alone, the backward's pass took
10-12 ms at B = 4 on one core against ~5 ms as AVX-512.

Numerics (docs/contract.md): elementwise work and the hidden activations z in float32 (float64
for float64 inputs), one rounding to x's dtype at the end. The scorer GEMM always has a
float32 / float64 output (a 16-bit z overflows in float16 at 65504). For bfloat16 (float16)
inputs on a CPU where oneDNN has a fast 16-bit GEMM (and FLASHSLOTH_CPU_ISA does not force a
variant below AVX-512), z = x W1^T (forward and the backward's recompute) runs on oneDNN's
brgemm micro-kernel with 16-bit operands and an fp32 output (ATen's cpublas::brgemm; ATen's
16-bit GEMMs round their output to 16 bits), and the backward's dW1 / dx GEMMs run in that dtype
(fp32 accumulation) with dz rounded to it as their operand; elsewhere x is converted once and
every GEMM runs in float32, since PyTorch's fallback 16-bit GEMM is 5-70x slower.

Determinism: run to run, every output is bitwise identical. Every sum of ours runs in an order
fixed by the problem, never by the thread count; the GEMMs are MKL's / oneDNN's, and a library
GEMM may split a long reduction (dW1 = dz^T x sums over all B * N rows) differently at another
thread count. Measured on the 2-core Sapphire Rapids test machine, every output was bitwise equal
at 1, 2, 3, 4 and 8 threads (B = 3, 27 x 27, C = 1152, fp32 and bf16;
tests/test_sap.py::test_cpu_deterministic_across_thread_counts), but dW1 differing in the last
bits between thread counts has been seen on another AVX-512 machine (2.7e-5 at B = 3): equality
across thread counts is promised for everything but dW1 (and whatever depends on it).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _compat, _env, _ext

Tensor = torch.Tensor

_ops = _ext.cpu_ops("flashsloth_kernels.sap._C")
# the ops' overloads, bound once: calling them directly skips the overload packet's lookup
# (~1.6 us a call)
_fwd_kernel = _ops.spatial_attention_pool_fwd.default
_bwd_kernel = _ops.spatial_attention_pool_bwd.default
_isa = _ext.IsaSwitch("flashsloth_kernels.sap._C", "spatial_attention_pool")


def _lowp_gemm(dtype: torch.dtype) -> bool:
    """Whether the backward's GEMMs may run in ``dtype`` (bfloat16 / float16): oneDNN has a fast
    GEMM in it on this CPU, and FLASHSLOTH_CPU_ISA does not force a variant below AVX-512."""
    return _env.cpu_isa() in ("auto", "avx512bf16", "avx512") and _compat.mkldnn_fast_gemm(dtype)


def sap_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            kh: int, kw: int, H: int, W: int, dropout_mask: Optional[Tensor],
            dropout_scale: float) -> Tensor:
    """Fused forward. x: (B, N = H * W, C), w1: (Ch, C), b1: (Ch,) or None, w2: (Ch,),
    b2: (1,) or None, dropout_mask: (B, N, Ch) bool or None -> (B, G, C) in x's dtype."""
    _isa.apply()
    return _fwd_kernel(x.contiguous(), w1, b1, w2, b2, kh, kw, H, W,
                       None if dropout_mask is None else dropout_mask.contiguous(),
                       float(dropout_scale), _lowp_gemm(x.dtype))


def sap_bwd(grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], kh: int, kw: int, H: int, W: int,
            dropout_mask: Optional[Tensor], dropout_scale: float, need_x: bool = True,
            need_w: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward, recomputing the hidden activations. grad_out: (B, G, C).

    Returns (dx (B, N, C), dw1 (Ch, C), db1 (Ch,), dw2 (Ch,), db2 (1,)), each in its input's
    dtype; dx is an empty tensor unless need_x, the other four unless need_w.
    """
    _isa.apply()
    return _bwd_kernel(grad_out.contiguous(), x.contiguous(), w1, b1, w2, b2, kh, kw, H, W,
                       None if dropout_mask is None else dropout_mask.contiguous(),
                       float(dropout_scale), bool(need_x), bool(need_w), _lowp_gemm(x.dtype))


def pool_stats() -> dict:
    """Bytes of the C++ CPU kernels' output pool (csrc/common/cpu_pool.h): ``live``, ``idle``
    (released buffers kept for the next call of the same size) and ``limit``
    (FLASHSLOTH_CPU_POOL_MB)."""
    return _isa.pool_stats()


def isa() -> str:
    """The instruction set the elementwise passes run with: "avx512bf16" (the avx512 passes
    under the name every op shares), "avx512", "avx2" or "baseline" (the widest this CPU
    supports, or the one FLASHSLOTH_CPU_ISA forces). The GEMMs are ATen's."""
    return _isa.current()


def supported_isas() -> Tuple[str, ...]:
    """The variants compiled in that this CPU can run, widest first."""
    return _isa.supported()
