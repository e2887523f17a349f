"""The model's SDPA wrapper (flashsloth/_sdpa.py): same result as PyTorch's on the CPU, and on
CUDA never cuDNN's attention (its per-shape host cost made 3.2B decoding launch-bound)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from flashsloth._sdpa import CUDA_BACKENDS, sdpa


def test_cpu_matches_pytorch_sdpa():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    for kw in ({}, {"is_causal": True}, {"attn_mask": mask}):
        expected = F.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(sdpa(q, k, v, **kw), expected, rtol=0, atol=0)


def test_cuda_backend_list_has_no_cudnn():
    assert SDPBackend.CUDNN_ATTENTION not in CUDA_BACKENDS
    assert SDPBackend.MATH in CUDA_BACKENDS  # every shape and dtype still runs


@pytest.mark.gpu
def test_cuda_runs_no_cudnn_kernel():
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(1, 32, 7, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = sdpa(q, k, v, is_causal=True)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert not any("cudnn" in n.lower() for n in names), names
    assert out.shape == q.shape and bool(out.isfinite().all())
