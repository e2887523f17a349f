"""The shared op scaffolding (flashsloth_kernels/_op.py, _compat.py), the cuda backend's
reasons, the modules' constructor checks (issue 10 §5, §3 Default).

The eager bypass and what it saves: flashsloth_kernels/_op.py and scripts/bench_op_dispatch.py.
"""

import pytest
import torch

import flashsloth_kernels as fk
from flashsloth_kernels import _compat, _ext, _op
from flashsloth_kernels.attention import op as attn_op
from flashsloth_kernels.sap import fused_cuda as sap_cuda
from flashsloth_kernels.sap import op as sap_op


def _sap_args():
    x = torch.randn(2, 9, 8)
    return x, torch.randn(4, 8), torch.randn(4), torch.randn(1, 4), torch.randn(1)


def test_both_ops_share_one_scaffolding():
    for mod in (sap_op, attn_op):
        assert isinstance(mod.fused, _op.FusedOp)
        assert mod.dispatcher is mod.fused.dispatcher
        assert mod.dispatcher.backends == ("reference", "cpu", "triton", "cuda")
        assert mod.fused.host("cpu") is mod.fused.host("cpu")  # imported and looked up once
    assert sap_op.fused.host("reference")[0] is sap_op.reference.sap_reference_fwd


class _CountingOp:
    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@pytest.mark.parametrize("fallback", [False, True])
def test_eager_bypass_and_its_public_fallback(monkeypatch, fallback):
    """Unobserved inference calls skip the registered op; without the private torch APIs
    (compat fallback) every call goes through the public op, with the same result."""
    monkeypatch.setattr(_compat, "FORCE_FALLBACK", fallback)
    counter = _CountingOp(sap_op.fused.op)
    monkeypatch.setattr(sap_op.fused, "op", counter)
    args = _sap_args()
    with torch.no_grad():
        out = fk.spatial_attention_pool(*args, window=3, backend="cpu")
    assert counter.calls == (1 if fallback else 0)
    torch.testing.assert_close(out, torch.ops.flashsloth.spatial_attention_pool(
        args[0], args[1], args[2], args[3].reshape(4), args[4], 3, 3, 3, 3, None, 1.0, "cpu"))
    # gradients: unobserved calls run the op's autograd glue without the op
    x = args[0].clone().requires_grad_()
    fk.spatial_attention_pool(x, *args[1:], window=3, backend="cpu")
    assert counter.calls == (2 if fallback else 0)
    # observed calls always take the op: autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fk.spatial_attention_pool(*args, window=3, backend="cpu")
    assert counter.calls == (3 if fallback else 1)


def _attn_call(q, k, v):
    return fk.query_patch_attention(q, k, v, backend="cpu")


def _sap_call(x, w1, b1, w2, b2):
    return fk.spatial_attention_pool(x, w1, b1, w2, b2, window=3, backend="cpu")


@pytest.mark.parametrize("mod,call,make", [
    (attn_op, _attn_call, lambda: (torch.randn(2, 3, 5, 7), torch.randn(2, 3, 11, 7),
                                   torch.randn(2, 3, 11, 6))),
    (sap_op, _sap_call, _sap_args),
])
def test_eager_autograd_bypass_matches_the_op(monkeypatch, mod, call, make):
    """Unobserved calls that need gradients run an autograd.Function with the op's own
    setup_context / backward and call the kernels directly: the same outputs and gradients,
    bit for bit, as through the registered ops (taken when the private APIs are missing);
    create_graph=True still reaches the backward op, whose missing autograd formula raises
    at the double backward."""
    def grads(fallback):
        monkeypatch.setattr(_compat, "FORCE_FALLBACK", fallback)
        fwd, bwd = _CountingOp(mod.fused.op), _CountingOp(mod.fused.backward_op)
        monkeypatch.setattr(mod.fused, "op", fwd)
        monkeypatch.setattr(mod.fused, "backward_op", bwd)
        torch.manual_seed(0)
        ins = [t.requires_grad_() for t in make()]
        out = call(*ins)
        g = torch.autograd.grad(out, ins, torch.ones_like(out))
        assert (fwd.calls, bwd.calls) == ((1, 1) if fallback else (0, 0))
        monkeypatch.undo()
        return out, g

    out_op, g_op = grads(True)
    out_eager, g_eager = grads(False)
    torch.testing.assert_close(out_eager, out_op, rtol=0, atol=0)
    for a, b in zip(g_eager, g_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ins = [t.requires_grad_() for t in make()]
    out = call(*ins)
    g = torch.autograd.grad(out, ins, torch.ones_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match="backward.* no autograd formula was registered"):
        torch.autograd.grad(g[0].sum(), ins, allow_unused=True)


def test_nothing_observes_is_false_under_a_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    t = torch.ones(1)
    assert _compat.nothing_observes(t)
    with Mode():
        assert not _compat.nothing_observes(t)


def test_cuda_backend_reports_missing_triton_for_gradients(monkeypatch):
    monkeypatch.setattr(_ext, "triton_error", lambda: "triton is not importable (test)")
    why = sap_op.dispatcher.reasons("cuda", torch.device("cuda"), torch.float32, needs_grad=True)
    assert any("its backward runs the Triton kernels" in w for w in why)
    why = sap_op.dispatcher.reasons("cuda", torch.device("cuda"), torch.float32, needs_grad=False)
    assert not any("Triton" in w for w in why)
    monkeypatch.setattr(sap_cuda, "triton_error", lambda: "triton is not importable (test)")
    x, w1, b1, w2, b2 = _sap_args()
    with pytest.raises(RuntimeError, match="backward runs the Triton kernels"):
        sap_cuda.sap_bwd(torch.ones(2, 1, 8), x, w1, b1, w2.reshape(4), b2, 3, 3, 3, 3, None, 1.0)


def test_kernel_ops_have_one_name_and_namespace():
    """The compiled kernels are flashsloth::<op>_fwd / _bwd, one schema for every device."""
    for name in ("spatial_attention_pool", "query_patch_attention"):
        for suffix in ("", "_backward", "_fwd", "_bwd"):
            assert hasattr(torch.ops.flashsloth, name + suffix)
    if _ext.ext_error("flashsloth_kernels.sap._C") is None:
        from flashsloth_kernels.sap import fused_cpu  # noqa: F401

        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            "flashsloth::spatial_attention_pool_fwd", "CPU")


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=0), "dim: expected an int >= 1, got 0"),
    (dict(dim=8, window=0), "window: expected an int >= 1, got 0"),
    (dict(dim=8, window=(2, 0)), r"window\[1\]: expected an int >= 1"),
    (dict(dim=8, hidden_dim=-1), "hidden_dim: expected an int >= 1"),
    (dict(dim=8, dropout=1.5), r"dropout: expected a float in \[0, 1\)"),
    (dict(dim=8, backend="gpu"), "backend: expected one of"),
])
def test_sap_module_validates_its_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fk.SpatialAttentionPool(**kwargs)


def test_compat_fallbacks_answer_conservatively(monkeypatch):
    """Every private-API helper in _compat has a safe answer when the API is missing, and the
    ops give the same results through it."""
    args = _sap_args()
    with torch.no_grad():
        want = fk.spatial_attention_pool(*[t.bfloat16() for t in args], window=3, backend="cpu")
    monkeypatch.setattr(_compat, "FORCE_FALLBACK", True)
    assert not _compat.nothing_observes(torch.ones(1))
    assert not _compat.mkldnn_fast_gemm(torch.bfloat16)   # fp32 GEMMs
    with torch.no_grad():
        got = fk.spatial_attention_pool(*[t.bfloat16() for t in args], window=3, backend="cpu")
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)


def test_opcheck_the_compiled_kernel_ops():
    """flashsloth::<op>_fwd / _bwd: schema, fake kernels and the CPU kernels agree."""
    if _ext.ext_error("flashsloth_kernels.sap._C") or _ext.ext_error(
            "flashsloth_kernels.attention._C"):
        pytest.skip("the C++ extensions are not built")
    from flashsloth_kernels.attention import fused_cpu as attn_cpu  # noqa: F401
    from flashsloth_kernels.sap import fused_cpu  # noqa: F401

    ops = torch.ops.flashsloth
    x, w1, b1, w2, b2 = _sap_args()
    sap = (x, w1, b1, w2.reshape(4), b2, 3, 3, 3, 3, None, 1.0)
    torch.library.opcheck(ops.spatial_attention_pool_fwd.default, sap)
    torch.library.opcheck(ops.spatial_attention_pool_bwd.default,
                          (torch.randn(2, 1, 8),) + sap + (True, True))
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
    mask = torch.tensor([[True, False, True, True, False]])
    torch.library.opcheck(ops.query_patch_attention_fwd.default, (q, k, v, mask, 0.5))
    out, lse = ops.query_patch_attention_fwd(q, k, v, mask, 0.5)
    torch.library.opcheck(ops.query_patch_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, mask, 0.5, out, lse))


def test_cuda_auto_order_per_op_and_size():
    """The measured CUDA preferences (benchmarks/results/nvidia-h200/): SAP's extension first at
    every size; attention's extension for host-bound sizes, Triton from LARGE_KEYS_X_HEADS on.
    The rule reads the problem's facts, and a named backend is never overridden."""
    from flashsloth_kernels.attention import op as attn_op
    from flashsloth_kernels.sap import op as sap_op

    cuda = torch.device("cuda")
    assert sap_op.dispatcher._order_for(cuda, {"large": True})[0] == "cuda"
    assert attn_op.dispatcher._order_for(cuda, {"large": False})[0] == "cuda"
    assert attn_op.dispatcher._order_for(cuda, {"large": True})[0] == "triton"
    assert attn_op.dispatcher._order_for(torch.device("cpu"), {"large": True})[0] == "cpu"
    q = torch.empty(1, 32, 9, 18, device="meta")
    assert not attn_op._large(q, torch.empty(8, 32, 729, 18, device="meta")[:1])
    assert attn_op._large(torch.empty(8, 32, 9, 18, device="meta"),
                          torch.empty(8, 32, 3645, 18, device="meta"))


def test_named_backend_cache_only_for_stable_backends():
    """A call naming a stable backend (reasons from device, dtype, facts and the build only) is
    answered from a cache once it could run; one whose reasons read the environment (Triton:
    TRITON_INTERPRET) is asked every time, and a refusal is never cached."""
    from flashsloth_kernels._dispatch import BackendUnavailableError, Dispatcher

    calls = {"cpu": 0, "triton": 0}
    verdict = {"cpu": [], "triton": []}

    def reasons_of(name):
        def fn(device, dtype, **facts):
            calls[name] += 1
            return list(verdict[name])
        return fn

    d = Dispatcher("scaffold_test_op")
    try:
        d.register("cpu", reasons_of("cpu"), stable=True)
        d.register("triton", reasons_of("triton"))
        dev = torch.device("cpu")
        for _ in range(3):
            assert d.select("cpu", dev, torch.float32, large=False) == "cpu"
            assert d.select("triton", dev, torch.float32, large=False) == "triton"
        assert calls == {"cpu": 1, "triton": 3}
        # other facts or dtype: asked again; a refusal is raised and not cached
        verdict["cpu"] = ["no"]
        with pytest.raises(BackendUnavailableError, match="no"):
            d.select("cpu", dev, torch.float64, large=False)
        with pytest.raises(BackendUnavailableError, match="no"):
            d.select("cpu", dev, torch.float64, large=False)
        assert d.select("cpu", dev, torch.float32, large=False) == "cpu"
        assert calls["cpu"] == 3
        verdict["triton"] = ["TRITON_INTERPRET is off"]
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            d.select("triton", dev, torch.float32, large=False)
        # registering again forgets what was cached
        d.register("cpu", reasons_of("cpu"), stable=True)
        with pytest.raises(BackendUnavailableError, match="no"):
            d.select("cpu", dev, torch.float32, large=False)
    finally:
        from flashsloth_kernels import _dispatch

        _dispatch.DISPATCHERS.pop("scaffold_test_op", None)


@pytest.mark.parametrize("plain_mapping", [False, True])
def test_per_call_env_reads_follow_every_change(monkeypatch, plain_mapping):
    """The variables read on every call (_env._parsed: os.environ's raw dict, parsed once per
    value) see every change made through os.environ, monkeypatch, or a plain mapping put in
    os.environ's place (the fallback through os.environ.get); a bad value raises every time."""
    import os

    from flashsloth_kernels import _env

    if plain_mapping:
        monkeypatch.setattr(os, "environ", dict(os.environ))
    for name in ("FLASHSLOTH_CPU_ISA", "FLASHSLOTH_CPU_POOL_MB", "FLASHSLOTH_BACKEND"):
        # setenv first, so that teardown restores the original (the writes below go straight
        # through os.environ, which monkeypatch does not see; delenv alone records nothing
        # for a variable that is not set)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert (_env.cpu_isa(), _env.cpu_pool_mb(), _env.default_backend()) == ("auto", 512, "auto")
    os.environ["FLASHSLOTH_CPU_ISA"] = " AVX2"
    os.environ["FLASHSLOTH_CPU_POOL_MB"] = "7"
    monkeypatch.setenv("FLASHSLOTH_BACKEND", "Reference")
    assert (_env.cpu_isa(), _env.cpu_pool_mb(), _env.default_backend()) == ("avx2", 7, "reference")
    monkeypatch.setenv("FLASHSLOTH_CPU_ISA", "sse9")
    for _ in range(2):
        with pytest.raises(ValueError, match="FLASHSLOTH_CPU_ISA='sse9'"):
            _env.cpu_isa()
    del os.environ["FLASHSLOTH_CPU_ISA"]
    os.environ["FLASHSLOTH_CPU_POOL_MB"] = "-1"
    assert _env.cpu_isa() == "auto"
    with pytest.raises(ValueError, match="FLASHSLOTH_CPU_POOL_MB='-1'"):
        _env.cpu_pool_mb()
    monkeypatch.setenv("FLASHSLOTH_CPU_POOL_MB", "")
    assert _env.cpu_pool_mb() == 512


def _full_path_only(monkeypatch):
    monkeypatch.setattr(attn_op, "_fast_call", lambda *args: None)


def _attn_cases():
    """Valid calls of every kind the fast path may take: dtypes, masks, scales, backends."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for B, H, Lq, Lk, Dk, Dv in ((2, 3, 9, 13, 18, 36), (1, 1, 1, 1, 1, 1),
                                     (1, 2, 17, 50, 7, 5)):
            q = torch.randn(B, H, Lq, Dk, generator=g).to(dtype)
            k = torch.randn(B, H, Lk, Dk, generator=g).to(dtype)
            v = torch.randn(B, H, Lk, Dv, generator=g).to(dtype)
            mask = torch.rand(B, Lk, generator=g) > 0.3
            mask[:, 0] = False  # a masked key in every row; row 0 of a 1-key case: all masked
            for kpm, scale, backend in ((None, None, None), (mask, 0.25, "cpu"),
                                        (None, 3.0, "reference"), (mask, None, "AUTO")):
                yield q, k, v, kpm, scale, backend
    # strided views (the kernels take any strides)
    q = torch.randn(2, 9, 3, 18).transpose(1, 2)
    k, v = torch.randn(2, 3, 40, 18), torch.randn(2, 3, 80, 36)[:, :, ::2]
    yield q, k, v, None, None, None


def test_attention_fast_path_matches_the_full_path(monkeypatch):
    """The public function's fast path (attention/op.py _fast_call, FusedOp.fast_call) takes
    every usual call and gives what the full path gives, bit for bit: outputs, and gradients
    through the op's own autograd glue."""
    taken = 0
    for q, k, v, kpm, scale, backend in _attn_cases():
        with torch.no_grad():
            fast = attn_op._fast_call(q, k, v, kpm, scale, backend)
        assert fast is not None, (q.dtype, q.shape, kpm is None, scale, backend)
        taken += 1
        with monkeypatch.context() as m:
            _full_path_only(m)
            full = fk.query_patch_attention(q, k, v, kpm, scale, backend=backend)
        torch.testing.assert_close(fast, full, rtol=0, atol=0, equal_nan=True)
        assert fast.is_contiguous() and fast.dtype == full.dtype
    assert taken == 49
    # gradients: the fast path runs the eager autograd.Function, as the full path does
    q, k, v, kpm, scale, _ = next(c for c in _attn_cases() if c[3] is not None)
    grads = []
    for fast_path in (True, False):
        with monkeypatch.context() as m:
            if not fast_path:
                _full_path_only(m)
            ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = fk.query_patch_attention(*ins, kpm, scale)
            grads.append((out,) + torch.autograd.grad(out, ins, torch.ones_like(out)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attention_fast_path_declines_what_it_must_not_take(monkeypatch):
    """Anything but a plain eager call with valid inputs goes to the full path (which then
    raises or runs it as before): errors, empty axes, subclasses, modes, transforms, autocast,
    forward AD, tracing, compile-time calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
    mask = torch.ones(1, 5, dtype=torch.bool)
    fast = attn_op._fast_call
    assert fast(q, k, v, mask, 0.5, None) is not None
    bad = [
        (q[0], k, v, None, None, None),                       # rank
        (q, k[:, :1], v, None, None, None),                   # heads
        (q, k, v[:, :, :4], None, None, None),                # Lk
        (q, k[..., :7], v, None, None, None),                 # Dk
        (q.double(), k, v, None, None, None),                 # dtypes differ
        (q.int(), k.int(), v.int(), None, None, None),        # not floating
        (q, k, v, mask.float(), None, None),                  # mask dtype
        (q, k, v, mask[:, :4], None, None),                   # mask shape
        (q, k, v, None, 0.0, None),                           # scale
        (q, k, v, None, float("nan"), None),
        (q, k, v, None, float("inf"), None),
        (q, k, v, None, 1, None),                             # an int: the full path takes it
        (q, k, v, None, True, None),
        (q[:, :, :0], k, v, None, None, None),                # empty axes
        (q, k[:, :, :0], v[:, :, :0], None, None, None),
        (q[:0], k[:0], v[:0], None, None, None),
        (q, k, torch.randn(1, 2, 5, 0), None, None, None),
        (torch.randn(1, 2, 3, 257), torch.randn(1, 2, 5, 257), v, None, None, None),
        (q.numpy(), k, v, None, None, None),
        (torch.nn.Parameter(q), k, v, None, None, None),      # a subclass
    ]
    for args in bad:
        assert fast(*args) is None
    # a bad backend name raises the full path's error
    for backend, err in (("gpu", ValueError), (3, TypeError)):
        with pytest.raises(err, match="backend: expected"):
            fast(q, k, v, None, None, backend)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert fast(q, k, v, None, None, None) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(q, k, v, None, None, None) is None
    from torch.autograd import forward_ad
    with forward_ad.dual_level():
        assert fast(q, k, v, None, None, None) is None
    seen = []

    def under_vmap(a):
        seen.append(fast(a, k[0], v[0], None, None, None))
        return a

    torch.func.vmap(under_vmap)(q)
    assert seen == [None]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fast(q, k, v, None, None, None) is None
    monkeypatch.undo()
    monkeypatch.setattr(_compat, "FORCE_FALLBACK", True)
    assert fast(q, k, v, None, None, None) is None
