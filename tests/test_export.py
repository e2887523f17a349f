"""torch.export of both ops and modules (issue 10 §3).

The rule (flashsloth_kernels/_op.py): the exported graph holds the *requested* backend, so a
program exported with backend None / "auto" resolves it where and when it runs (CPU tensors ->
the C++ kernels, CUDA tensors -> Triton), while an explicitly named backend is part of the
program as it is. 3-D SAP input exports with a dynamic N (a square grid whose side the op takes
when it runs); 4-D input with dynamic H and W.
"""

import io

import pytest
import torch
from torch.export import Dim

import flashsloth_kernels as fk
from flashsloth_kernels.attention import op as attn_op
from flashsloth_kernels.sap import op as sap_op


def _backend_args(ep, target):
    return [n.args[-1] for n in ep.graph.nodes
            if n.op == "call_function" and target in str(n.target)]


def _roundtrip(ep):
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


def _pool():
    torch.manual_seed(0)
    return fk.SpatialAttentionPool(16, window=3, hidden_dim=8).eval()


def test_sap_3d_input_exports_with_a_dynamic_n():
    pool = _pool()
    ep = torch.export.export(pool, (torch.randn(2, 36, 16),),
                             dynamic_shapes=({1: Dim("N", min=4, max=4096)},))
    prog = _roundtrip(ep).module()
    for n in (81, 49, 16):
        x = torch.randn(2, n, 16)
        torch.testing.assert_close(prog(x), pool(x))
    with pytest.raises(ValueError, match="N = 50 patches is not a perfect square"):
        prog(torch.randn(2, 50, 16))


def test_sap_4d_input_exports_with_dynamic_h_and_w():
    pool = _pool()
    ep = torch.export.export(pool, (torch.randn(2, 6, 6, 16),), dynamic_shapes=(
        {1: Dim("H", min=3, max=64), 2: Dim("W", min=3, max=64)},))
    x = torch.randn(2, 9, 12, 16)
    torch.testing.assert_close(_roundtrip(ep).module()(x), pool(x))


def test_exported_program_resolves_auto_when_it_runs(monkeypatch):
    """The graph holds "auto"; the loaded program picks the backend of the machine and
    tensors it runs on (here: whatever the dispatcher prefers at run time)."""
    monkeypatch.delenv("FLASHSLOTH_BACKEND", raising=False)
    pool = _pool()
    ep = torch.export.export(pool, (torch.randn(1, 36, 16),))
    assert _backend_args(ep, "spatial_attention_pool") == ["auto"]
    prog = _roundtrip(ep).module()
    ran = []
    ref_fwd, ref_bwd = sap_op.fused.host("reference")
    monkeypatch.setitem(sap_op.fused._hosts, "reference",
                        (lambda *a: ran.append("reference") or ref_fwd(*a), ref_bwd))
    # the machine the program lands on prefers the reference backend for CPU tensors
    monkeypatch.setitem(sap_op.dispatcher.order, "cpu", ("reference",))
    sap_op.dispatcher._auto_cache.clear()
    x = torch.randn(1, 36, 16)
    out = prog(x)
    assert ran == ["reference"]
    expected = pool(x)
    # restore the order, then forget the choice made under it: a cached "reference" would
    # leak into every later test of this process
    monkeypatch.undo()
    sap_op.dispatcher._auto_cache.clear()
    torch.testing.assert_close(out, expected)


def test_an_explicit_backend_is_part_of_the_program():
    pool = fk.SpatialAttentionPool(16, window=3, hidden_dim=8, backend="reference").eval()
    ep = torch.export.export(pool, (torch.randn(1, 36, 16),))
    assert _backend_args(ep, "spatial_attention_pool") == ["reference"]


def test_attention_and_embq_export_with_dynamic_key_length():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return fk.query_patch_attention(q, k, v)

    lk = Dim("Lk", min=1, max=4096)
    ep = torch.export.export(Attn(), (q, k, v), dynamic_shapes=(None, {2: lk}, {2: lk}))
    assert _backend_args(ep, "query_patch_attention") == ["auto"]
    k2, v2 = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    torch.testing.assert_close(_roundtrip(ep).module()(q, k2, v2),
                               fk.query_patch_attention(q, k2, v2))
    embq = fk.EmbeddedQuery(32, 16, down_dim=8, num_heads=2).eval()
    args = (torch.randn(1, 3, 32), torch.randn(1, 4, 32), None, torch.randn(1, 36, 16))
    ep = torch.export.export(embq, args)
    torch.testing.assert_close(ep.module()(*args), embq(*args))
    assert attn_op.dispatcher.select(None, torch.device("cpu"), torch.float32) in ("cpu",
                                                                                    "reference")


def test_sap_3d_input_compiles_with_dynamic_shapes():
    pool = _pool()
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (36, 81):
        x = torch.randn(2, n, 16)
        torch.testing.assert_close(compiled(x), pool(x))
