"""The model's scaled dot-product attention: PyTorch's SDPA with its backend list fixed on CUDA.

Measured on an H200 (torch 2.11 + CUDA 13, benchmarks/results/nvidia-h200/, 2026-12-04): with
PyTorch's default choice, every attention of the 3.2B model (LLM and vision tower) went to
cuDNN's attention, which spent ~0.9 ms of host time per call (graph building: a decode step's
key length changes every token), so a decode step took ~90 ms for ~6 ms of GPU work and a
prefill with 90 visual tokens was no faster than one with 729. Flash / memory-efficient
attention (and math as the last resort) have no such per-shape cost. On the CPU the default
choice is kept.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kwargs), on CUDA without cuDNN's backend."""
    if q.is_cuda:
        with sdpa_kernel(CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
