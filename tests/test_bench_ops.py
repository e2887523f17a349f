"""CPU op timings recorded by pytest-benchmark (the benchmark suite's providers, at FlashSloth's
sizes, batch 1). Nothing here asserts a time: speed is judged from ratios measured in one
run of ``python -m benchmarks``. Each test checks its result instead, so under CI's default
``--benchmark-disable`` (every benchmarked function then runs once) they are plain tests.

    python -m pytest tests/test_bench_ops.py --benchmark-enable     # record timings
"""

import pytest
import torch

from benchmarks import ops_attention, ops_sap

@pytest.fixture
def sap_inputs():
    return ops_sap.make_inputs(1, "cpu", torch.float32, requires_grad=False)


@pytest.fixture
def attn_inputs():
    return ops_attention.make_inputs(1, 729, "cpu", torch.float32, requires_grad=False)


def _check_sap(out, B=1):
    G = (ops_sap.H // ops_sap.K) * (ops_sap.W // ops_sap.K)
    assert out.shape == (B, G, ops_sap.C)
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="sap-fwd-B1")
def test_sap_fused_fwd(benchmark, sap_inputs):
    from flashsloth_kernels import spatial_attention_pool

    x, w1, b1, w2, b2 = sap_inputs
    out = benchmark(spatial_attention_pool, x, w1, b1, w2, b2, ops_sap.K)
    _check_sap(out)
    benchmark.extra_info["backend"] = _sap_backend()


@pytest.mark.benchmark(group="sap-fwd-B1")
def test_sap_gemm_floor(benchmark, sap_inputs):
    x, w1 = sap_inputs[:2]
    out = benchmark(torch.matmul, x, w1.t())
    assert out.shape == (1, ops_sap.H * ops_sap.W, ops_sap.CH)


@pytest.mark.benchmark(group="sap-fwd-B1")
def test_sap_reference_fwd(benchmark, sap_inputs):
    from flashsloth_kernels.sap.reference import sap_reference

    x, w1, b1, w2, b2 = sap_inputs
    K, H, W = ops_sap.K, ops_sap.H, ops_sap.W
    out = benchmark(sap_reference, x, w1, b1, w2.reshape(-1), b2, K, K, H, W)
    _check_sap(out)


@pytest.mark.benchmark(group="sap-fwd-B1")
def test_sap_loop_fwd(benchmark, sap_inputs):
    from flashsloth_kernels.sap.reference import sap_reference
    # one round even when enabled: the original window loop is slow

    x, w1, b1, w2, b2 = sap_inputs
    K, H, W = ops_sap.K, ops_sap.H, ops_sap.W
    out = benchmark.pedantic(ops_sap.sap_loop, (x, w1, b1, w2, b2, K, H, W), rounds=1,
                             iterations=1)
    _check_sap(out)
    # the loop provider computes the same thing as the reference
    ref = sap_reference(x, w1, b1, w2.reshape(-1), b2, K, K, H, W)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="sap-fwd+bwd-B1")
def test_sap_fused_fwd_bwd(benchmark):
    from flashsloth_kernels import spatial_attention_pool

    inputs = ops_sap.make_inputs(1, "cpu", torch.float32, requires_grad=True)
    g = torch.randn(1, 81, ops_sap.C)

    def step():
        out = spatial_attention_pool(*inputs, ops_sap.K)
        return torch.autograd.grad(out, inputs, g)

    grads = benchmark(step)
    for t, gt in zip(inputs, grads):
        assert gt.shape == t.shape and torch.isfinite(gt).all()


def _sap_backend():
    from flashsloth_kernels.sap.op import dispatcher

    return dispatcher.select(None, torch.device("cpu"), torch.float32)


def _check_attn(out, B=1):
    assert out.shape == (B, ops_attention.H, ops_attention.LQ, ops_attention.DV)
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="attention-fwd-B1-Lk729")
def test_attention_fused_fwd(benchmark, attn_inputs):
    from flashsloth_kernels import query_patch_attention

    q, k, v = attn_inputs
    out = benchmark(query_patch_attention, q, k, v)
    _check_attn(out)


@pytest.mark.benchmark(group="attention-fwd-B1-Lk729")
def test_attention_eager_fwd(benchmark, attn_inputs):
    from flashsloth_kernels import query_patch_attention

    q, k, v = attn_inputs
    scale = ops_attention.DK ** -0.5
    out = benchmark(ops_attention.eager_attention, q, k, v, scale)
    _check_attn(out)
    torch.testing.assert_close(out, query_patch_attention(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.benchmark(group="attention-fwd-B1-Lk729")
def test_attention_sdpa_fwd(benchmark, attn_inputs):
    q, k, v = attn_inputs
    out = benchmark(torch.nn.functional.scaled_dot_product_attention, q, k, v,
                    scale=ops_attention.DK ** -0.5)
    _check_attn(out)


@pytest.mark.benchmark(group="attention-fwd+bwd-B1-Lk729")
def test_attention_fused_fwd_bwd(benchmark):
    from flashsloth_kernels import query_patch_attention

    inputs = ops_attention.make_inputs(1, 729, "cpu", torch.float32, requires_grad=True)
    g = torch.randn(1, ops_attention.H, ops_attention.LQ, ops_attention.DV)

    def step():
        return torch.autograd.grad(query_patch_attention(*inputs), inputs, g)

    grads = benchmark(step)
    for t, gt in zip(inputs, grads):
        assert gt.shape == t.shape and torch.isfinite(gt).all()
