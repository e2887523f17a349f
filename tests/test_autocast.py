"""Both ops and both modules under torch.autocast, on every backend (issue 10 §3).

The rule (flashsloth_kernels/_op.py): inside ``torch.autocast(device, dtype)`` the forward op
casts its fp32 / fp16 / bf16 tensors to ``dtype`` and runs with autocast disabled, so every
backend computes the documented math on the cast inputs (fp32 accumulation, one rounding to
``dtype``) and returns ``dtype``. The expectation here is the float64 reference on the cast
inputs, with the tolerance of one rounding to ``dtype`` (plus fp32 accumulation error).
"""

import pytest
import torch
from conftest import HAS_CUDA, backend_devices

from flashsloth_kernels import (
    EmbeddedQuery,
    SpatialAttentionPool,
    query_patch_attention,
    spatial_attention_pool,
)


# bf16 is what users pick on CPU; the Triton interpreter only does fp16 (its bf16 arithmetic is
# wrong), so Triton on CPU is checked with fp16 autocast.
def _autocast_dtype(backend, device):
    return torch.float16 if backend == "triton" and device == "cpu" else torch.bfloat16


def _rtol(dtype):
    return 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10


def _sap_inputs(device):
    x = torch.randn(2, 25, 16, device=device)
    w1 = torch.randn(12, 16, device=device) * 0.3
    b1 = torch.randn(12, device=device) * 0.1
    w2 = torch.randn(1, 12, device=device) * 0.3
    b2 = torch.randn(1, device=device)
    return x, w1, b1, w2, b2


def _attn_inputs(device):
    q = torch.randn(2, 3, 5, 8, device=device)
    k = torch.randn(2, 3, 33, 8, device=device)
    v = torch.randn(2, 3, 33, 12, device=device)
    mask = torch.rand(2, 33, device=device) > 0.3
    return q, k, v, mask


def _close(got, want, dtype):
    tol = _rtol(dtype) * max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * tol, f"max error {err:.3g} > {2 * tol:.3g}"


@pytest.mark.parametrize("backend,device", backend_devices())
def test_sap_under_autocast_fp32_weights_16bit_activations(backend, device):
    dtype = _autocast_dtype(backend, device)
    x, w1, b1, w2, b2 = _sap_inputs(device)
    want = spatial_attention_pool(*[t.to(dtype).double() for t in (x, w1, b1, w2, b2)],
                                  window=2, backend="reference")
    xs = x.to(dtype).requires_grad_()  # 16-bit activations, fp32 weights
    ws = [t.clone().requires_grad_() for t in (w1, b1, w2, b2)]
    with torch.autocast(device, dtype=dtype):
        out = spatial_attention_pool(xs, *ws, window=2, backend=backend)
    assert out.dtype == dtype
    _close(out, want, dtype)
    out.float().sum().backward()
    # gradients reach the fp32 weights through autocast's casts, in their own dtype
    assert xs.grad.dtype == dtype and all(w.grad.dtype == torch.float32 for w in ws)
    assert all(torch.isfinite(w.grad).all() for w in ws)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_attention_under_autocast(backend, device):
    dtype = _autocast_dtype(backend, device)
    q, k, v, mask = _attn_inputs(device)
    want = query_patch_attention(*[t.to(dtype).double() for t in (q, k, v)], mask,
                                 backend="reference")
    # mixed input dtypes: fp32 q, 16-bit k, fp32 v (all become `dtype`)
    with torch.autocast(device, dtype=dtype):
        out = query_patch_attention(q, k.to(dtype), v, mask, backend=backend)
    assert out.dtype == dtype
    _close(out, want, dtype)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_modules_under_autocast(backend, device):
    dtype = _autocast_dtype(backend, device)
    pool = SpatialAttentionPool(16, window=3, hidden_dim=8, backend=backend).to(device).eval()
    embq = EmbeddedQuery(32, 16, down_dim=8, num_heads=2, backend=backend).to(device)
    x = torch.randn(1, 36, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        pooled = pool(x.to(dtype))  # 16-bit activations into an fp32 module
        hq = embq(torch.randn(1, 3, 32, device=device), torch.randn(1, 4, 32, device=device),
                  None, x)
    assert pooled.dtype == dtype and pooled.shape == (1, 4, 16)
    assert torch.isfinite(pooled).all() and torch.isfinite(hq).all()
    # the pooled result is the op's math on the cast inputs
    fc1, fc2 = pool.mlp[0], pool.mlp[3]
    want = spatial_attention_pool(*[t.detach().to(dtype).double() for t in
                                    (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)],
                                  window=3, backend="reference")
    _close(pooled, want, dtype)


def test_reference_backend_is_not_autocast_inside_the_op():
    """The reference backend's own torch ops run with autocast off: fp32 inputs under bf16
    autocast give exactly the bf16-input result (before, the inner GEMMs drifted by 7e-3)."""
    x, w1, b1, w2, b2 = _sap_inputs("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = spatial_attention_pool(x, w1, b1, w2, b2, window=2, backend="reference")
    want = spatial_attention_pool(*[t.bfloat16() for t in (x, w1, b1, w2, b2)], window=2,
                                  backend="reference")
    assert torch.equal(got, want)


def test_float64_inputs_are_not_cast():
    x, w1, b1, w2, b2 = [t.double() for t in _sap_inputs("cpu")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = spatial_attention_pool(x, w1, b1, w2, b2, window=2, backend="cpu")
    assert out.dtype == torch.float64


def test_mixed_dtypes_outside_autocast_name_both():
    x, w1, b1, w2, b2 = _sap_inputs("cpu")
    with pytest.raises(TypeError, match=r"w1: expected dtype torch.bfloat16.*got torch.float32"):
        spatial_attention_pool(x.bfloat16(), w1, b1, w2, b2, window=2)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_autocast_on_cpu_tensors_is_ignored():
    x, w1, b1, w2, b2 = _sap_inputs("cpu")
    with torch.autocast("cuda", dtype=torch.float16):
        assert spatial_attention_pool(x, w1, b1, w2, b2, window=2).dtype == torch.float32


def test_compiled_module_under_autocast_matches_eager():
    pool = SpatialAttentionPool(16, window=3, hidden_dim=8).eval()
    x = torch.randn(2, 36, 16)
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), pool(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
