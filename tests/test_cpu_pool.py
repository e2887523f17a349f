"""The C++ CPU kernels' output pool (csrc/common/cpu_pool.h, FLASHSLOTH_CPU_POOL_MB).

Outputs of 1 MiB or more come from a pool of released buffers instead of fresh mmap'ed memory
(whose first write page-faults page by page). What must hold: a buffer is reused only after
every tensor on it is gone, results never depend on the pool, the limit bounds what it keeps,
the profiler still sees the memory, and a bad limit is a clear error.
"""

import pytest
import torch

from flashsloth_kernels import _ext, query_patch_attention

pytestmark = pytest.mark.skipif(_ext.ext_error("flashsloth_kernels.attention._C") is not None,
                                reason="the C++ extensions are not built")

MIB = 1 << 20


def _stats():
    from flashsloth_kernels.attention import fused_cpu

    return fused_cpu.pool_stats()


def _inputs(B=2, H=4, Lq=3, Lk=4001, Dk=18, Dv=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, Dk, generator=g)
    k = torch.randn(B, H, Lk, Dk, generator=g)
    v = torch.randn(B, H, Lk, Dv, generator=g)
    return q, k, v


def _bwd(q, k, v):
    from flashsloth_kernels.attention import fused_cpu

    out, lse = fused_cpu.attn_fwd(q, k, v, None, q.shape[-1] ** -0.5)
    gout = torch.ones_like(out)
    return fused_cpu.attn_bwd(gout, q, k, v, None, q.shape[-1] ** -0.5, out, lse)


@pytest.fixture
def pool_mb(monkeypatch):
    def set_mb(mb):
        for value in (0, mb):  # 0 first: what earlier tests left idle is freed
            monkeypatch.setenv("FLASHSLOTH_CPU_POOL_MB", str(value))
            _stats()  # applies it
    yield set_mb
    monkeypatch.delenv("FLASHSLOTH_CPU_POOL_MB", raising=False)
    _stats()


def test_released_outputs_are_reused_and_live_ones_never(pool_mb):
    pool_mb(64)
    q, k, v = _inputs()
    dv_bytes = v.numel() * 4
    assert dv_bytes >= MIB  # dk, dv come from the pool; dq (small) does not
    _, dk1, dv1 = _bwd(q, k, v)
    assert _stats()["live"] >= dv_bytes
    keep = dv1.clone()
    # dk1 / dv1 still alive: the second call must get other memory
    _, dk2, dv2 = _bwd(q, k, v)
    assert dv2.data_ptr() != dv1.data_ptr() and dk2.data_ptr() != dk1.data_ptr()
    torch.testing.assert_close(dv1, keep, rtol=0, atol=0)  # untouched by the second call
    ptr = dv1.data_ptr()
    del dk1, dv1
    idle = _stats()["idle"]
    assert idle >= dv_bytes
    _, dk3, dv3 = _bwd(q, k, v)  # the released buffer serves the next call of that size
    assert ptr in (dv3.data_ptr(), dk3.data_ptr())
    assert _stats()["idle"] < idle
    torch.testing.assert_close(dv3, dv2, rtol=0, atol=0)


def test_results_do_not_depend_on_the_pool(pool_mb):
    q, k, v = _inputs(seed=1)
    pool_mb(0)
    live = _stats()["live"]
    want = _bwd(q, k, v)
    assert _stats()["live"] == live  # pool off: nothing drawn from it
    pool_mb(64)
    for _ in range(3):  # fresh, then reused buffers (holding the previous call's values)
        got = _bwd(q, k, v)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_limit_bounds_the_idle_bytes(pool_mb):
    pool_mb(64)
    q, k, v = _inputs()
    grads = _bwd(q, k, v)
    del grads
    assert 0 < _stats()["idle"] <= 64 * MIB
    pool_mb(0)  # lowering the limit frees what is above it
    assert _stats()["idle"] == 0 and _stats()["limit"] == 0
    grads = _bwd(q, k, v)
    del grads
    assert _stats()["idle"] == 0
    pool_mb(1)  # below one dv: released buffers go back to the system
    grads = _bwd(q, k, v)
    del grads
    assert _stats()["idle"] <= MIB


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_a_bad_limit_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("FLASHSLOTH_CPU_POOL_MB", value)
    with pytest.raises(ValueError, match=r"FLASHSLOTH_CPU_POOL_MB=.*expected an integer >= 0"):
        _stats()


def test_the_profiler_sees_pooled_memory(pool_mb):
    """Memory profiles (and the benchmark's peak memory) count pooled outputs as allocations,
    reused or not."""
    from benchmarks.timing import peak_memory_bytes

    q, k, v = _inputs()
    peaks = []
    for mb in (0, 64, 64):
        pool_mb(mb)
        peaks.append(peak_memory_bytes(lambda: _bwd(q, k, v), torch.device("cpu")))
    assert peaks[0] is not None and peaks[0] >= (k.numel() + v.numel()) * 4
    assert peaks[1] == peaks[0] and peaks[2] == peaks[0]


def test_pooled_gradients_accumulate_through_autograd(pool_mb):
    """Pooled tensors are ordinary leaves' .grad: accumulated in place, released with them."""
    pool_mb(64)
    live = _stats()["live"]
    q, k, v = (t.requires_grad_() for t in _inputs(seed=2))
    for _ in range(2):
        query_patch_attention(q, k, v, backend="cpu").sum().backward()
    g1 = v.grad.clone()
    v.grad = k.grad = q.grad = None
    query_patch_attention(q, k, v, backend="cpu").sum().backward()
    torch.testing.assert_close(g1, 2 * v.grad, rtol=1e-6, atol=0)
    v.grad = k.grad = q.grad = None
    assert _stats()["live"] == live
