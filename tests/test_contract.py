"""The numeric contract of docs/contract.md, per backend (reference, cpu, triton under the
interpreter or on a GPU, cuda on a GPU): NaN / inf propagation, masked keys that never
influence anything, large finite values, and the documented ranges."""

import math

import pytest
import torch
from conftest import backend_devices
from test_attention import check_attention
from test_sap import check_sap, make_inputs as sap_inputs

from flashsloth_kernels import query_patch_attention, spatial_attention_pool
from flashsloth_kernels.attention.reference import query_patch_attention_reference
from flashsloth_kernels.sap.reference import sap_reference

ATTN = torch.ops.flashsloth.query_patch_attention
NAN, INF = math.nan, math.inf

# ------------------------------------------------------------------------------------- SAP
# 2 images of a 5x7 grid, 2x3 windows: 3 x 3 = 9 windows, partial at the edges.
B, H, W, C, Ch, KH, KW = 2, 5, 7, 8, 12, 2, 3
G = 9


def _window_of(r, c):
    return (r // KH) * math.ceil(W / KW) + c // KW


def _sap(backend, device, x, w1, b1, w2, b2):
    t = [v.to(device) for v in (x, w1, b1, w2, b2)]
    return spatial_attention_pool(*t, (KH, KW), (H, W), backend=backend).cpu()


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_sap_bad_patch_poisons_exactly_its_window(backend, device, value):
    x, w1, b1, w2, b2 = sap_inputs(B, H, W, C, Ch)
    r, c = 3, 4                                  # patch (3, 4) of image 1 -> window (1, 1)
    x[1, r * W + c, 2] = value
    out = _sap(backend, device, x, w1, b1, w2, b2)
    ref = sap_reference(x.double(), w1.double(), b1.double(), w2.reshape(Ch).double(), b2.double(),
                        KH, KW, H, W)
    bad = torch.zeros(B, G, dtype=torch.bool)
    bad[1, _window_of(r, c)] = True
    assert torch.equal(~torch.isfinite(ref).all(-1), bad)        # the reference's own pattern
    assert torch.equal(~torch.isfinite(out).all(-1), bad), "non-finite windows differ"
    assert torch.isnan(out[1, _window_of(r, c)]).any() or not torch.isfinite(out[1, _window_of(r, c)]).all()
    # every other window is exactly what it is without the bad patch's window
    good = ~bad
    torch.testing.assert_close(out[good], ref[good].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("where", ["w1", "b1", "w2", "b2"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_sap_bad_weight_poisons_every_output(backend, device, where, value):
    """NaN in w1 / b1 / w2 / b2 (a diverged checkpoint): every output NaN, never finite.
    (inf in w1 / b1 / w2 can also give +-inf scores: the outputs are then non-finite.)"""
    x, w1, b1, w2, b2 = sap_inputs(B, H, W, C, Ch)
    t = dict(w1=w1, b1=b1, w2=w2, b2=b2)[where]
    t.view(-1)[0] = value
    if where == "b1" and value == INF:
        w2.view(-1)[0] = 0.0      # relu(inf) * 0 = NaN: the formula's own arithmetic
    out = _sap(backend, device, x, w1, b1, w2, b2)
    ref = sap_reference(x, w1, b1, w2.reshape(Ch), b2, KH, KW, H, W)
    if value != value:
        assert torch.isnan(ref).all()
        assert torch.isnan(out).all(), f"{int(torch.isfinite(out).sum())} finite outputs"
    else:
        # inf: the pattern IEEE arithmetic of the formula gives (an inf in w1 makes +-inf
        # hidden activations, so only some windows see an inf score)
        assert not torch.isfinite(ref).all()
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), "non-finite pattern differs"
        fin = torch.isfinite(ref)
        torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_sap_float16_near_the_top_of_its_range(backend, device):
    """|x| near 65504 in float16: the hidden activations are fp32, so nothing overflows and the
    result is as accurate as plain PyTorch at float16 (fp32 math, one rounding)."""
    x, w1, b1, w2, b2 = sap_inputs(B, H, W, C, Ch)
    x = (x / x.abs().max() * 65000.0)
    inputs = [t.half() for t in (x, w1, b1, w2, b2)]
    leaves = [t.to(device).requires_grad_() for t in inputs]
    out = spatial_attention_pool(*leaves, (KH, KW), (H, W), backend=backend)
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite outputs"
    check_sap(out.detach().cpu(), [], inputs, torch.zeros(B, G, C, dtype=torch.float16), KH, KW, H, W,
              names=())


# ------------------------------------------------------------------------------- attention
AB, AH, LQ, LK, DK, DV = 2, 3, 5, 40, 16, 8


def _attn_inputs():
    q = torch.randn(AB, AH, LQ, DK)
    k = torch.randn(AB, AH, LK, DK)
    v = torch.randn(AB, AH, LK, DV)
    mask = torch.rand(AB, LK) > 0.3
    mask[:, 0] = True
    return q, k, v, mask


def _attn(backend, device, q, k, v, mask, scale=None, grad=None):
    """(out, lse, (dq, dk, dv)) on the CPU; gradients only when ``grad`` is given."""
    leaves = [t.to(device).requires_grad_(grad is not None) for t in (q, k, v)]
    m = None if mask is None else mask.to(device)
    out, lse = ATTN(*leaves, m, DK ** -0.5 if scale is None else scale, backend)
    grads = None
    if grad is not None:
        grads = [t.cpu() for t in torch.autograd.grad(out, leaves, grad.to(device))]
    return out.detach().cpu(), lse.detach().cpu(), grads


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("garbage", [NAN, INF, 1e30], ids=["nan", "inf", "1e30"])
def test_masked_keys_never_influence_anything(backend, device, garbage):
    """Whatever the k / v rows of masked-out keys hold, out, lse and dq are those of the same
    call with those rows zeroed, and their dk / dv are exactly 0."""
    q, k, v, mask = _attn_inputs()
    grad = torch.randn(AB, AH, LQ, DV)
    masked = ~mask[:, None, :, None]
    k0, v0 = k.masked_fill(masked, 0), v.masked_fill(masked, 0)
    kg, vg = k.masked_fill(masked, garbage), v.masked_fill(masked, garbage)
    out, lse, grads = _attn(backend, device, q, kg, vg, mask, grad=grad)
    out0, lse0, grads0 = _attn(backend, device, q, k0, v0, mask, grad=grad)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, out0, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse0, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads0[0], rtol=0, atol=0)
    for name, g in zip(("dk", "dv"), grads[1:]):
        assert torch.isfinite(g).all(), name
        assert not g.masked_select(masked).any(), f"{name} of masked keys is not 0"
    # and the zeroed call meets the accuracy criterion
    check_attention(out0, grads0, q, k0, v0, mask, grad, lse=lse0)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_all_masked_row_with_garbage_keys(backend, device):
    """A sample whose keys are all masked: out = 0, lse = +inf, zero gradients, even with NaN in
    its k / v rows."""
    q, k, v, mask = _attn_inputs()
    mask[1] = False
    k[1], v[1] = NAN, INF
    grad = torch.randn(AB, AH, LQ, DV)
    out, lse, grads = _attn(backend, device, q, k, v, mask, grad=grad)
    assert not out[1].any() and torch.isinf(lse[1]).all() and (lse[1] > 0).all()
    assert all(not g[1].any() for g in grads)
    assert torch.isfinite(out[0]).all() and all(torch.isfinite(g[0]).all() for g in grads)


def _nan_rows_case(kind):
    """Inputs where row (b=0, h=1, i=2) has a non-finite score at an attended key."""
    q, k, v, mask = _attn_inputs()
    if kind == "nan-q":
        q[0, 1, 2, 3] = NAN
    elif kind == "inf-q":
        q[0, 1, 2, 3] = INF
    elif kind in ("overflow+", "overflow-"):
        # q . k overflows fp32 at key 0 (attended) for query 2 only: |s| > 3.4e38
        q[0, 1, 2] = 0
        q[0, 1, 2, 0] = 1e30 if kind == "overflow+" else -1e30
        k[0, 1, 0] = 0
        k[0, 1, 0, 0] = 1e30
    return q, k, v, mask


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("kind", ["nan-q", "inf-q", "overflow+", "overflow-"])
def test_non_finite_score_makes_its_row_nan(backend, device, kind):
    """A NaN, +inf or -inf score at an attended key: that row's out and lse are NaN (the same
    rows on every backend); every other row is finite and accurate."""
    q, k, v, mask = _nan_rows_case(kind)
    out, lse, _ = _attn(backend, device, q, k, v, mask)
    ref_out, ref_lse = query_patch_attention_reference(q, k, v, mask, DK ** -0.5)
    row = torch.zeros(AB, AH, LQ, dtype=torch.bool)
    row[0, 1, 2] = True
    assert torch.equal(torch.isnan(ref_lse), row) and torch.isnan(ref_out[row]).all()
    assert torch.equal(torch.isnan(lse), row), "NaN lse rows differ from the contract's"
    assert torch.isnan(out[row]).all(), "the row with a non-finite score is not NaN"
    assert torch.isfinite(out[~row]).all() and torch.isfinite(lse[~row]).all()
    torch.testing.assert_close(out[~row], ref_out[~row], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_non_finite_attended_v_gives_the_references_non_finite_pattern(backend, device, value):
    q, k, v, mask = _attn_inputs()
    v[1, 2, 0, 5] = value                 # key 0 is attended in every sample
    out, lse, _ = _attn(backend, device, q, k, v, mask)
    ref_out, _ = query_patch_attention_reference(q.double(), k.double(), v.double(), mask, DK ** -0.5)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref_out))
    assert not torch.isfinite(out[1, 2, :, 5]).any()
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("backend,device", backend_devices())
def test_large_values_are_finite_inside_the_documented_range(backend, device):
    """Lk * max|v| < 3.4e38 and scores that fit fp32: finite and accurate."""
    q, k, v, mask = _attn_inputs()
    v = v / v.abs().max() * (3.0e38 / (2 * LK))
    q = q * 30.0                                      # scores of a few hundred
    out, lse, _ = _attn(backend, device, q, k, v, mask)
    ref_out, ref_lse = query_patch_attention_reference(q.double(), k.double(), v.double(), mask,
                                                       DK ** -0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5 * 3.0e38 / (2 * LK))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_beyond_the_range_never_finite_and_wrong(backend, device):
    """v = 3e38 (Lk * max|v| beyond fp32): an output may be non-finite, never finite and wrong."""
    q, k, v, mask = _attn_inputs()
    v = torch.full_like(v, 3.0e38)
    v[..., 1::2] = -3.0e38
    out, _, _ = _attn(backend, device, q, k, v, mask)
    ref_out, _ = query_patch_attention_reference(q.double(), k.double(), v.double(), mask, DK ** -0.5)
    fin = torch.isfinite(out)
    torch.testing.assert_close(out[fin].double(), ref_out[fin], rtol=1e-4, atol=0)


@pytest.mark.parametrize("scale", [0.0, -1.0, 1e300, INF, NAN, 1e4 * (1 + 1e-9)])
def test_scale_outside_the_documented_range_is_refused(scale):
    q, k, v, mask = _attn_inputs()
    with pytest.raises(ValueError, match=r"scale: expected a finite float in \(0, 10000\]"):
        query_patch_attention(q, k, v, mask, scale)


def test_scale_at_the_edge_of_the_range_is_accepted():
    q, k, v, mask = _attn_inputs()
    out = query_patch_attention(q * 1e-3, k * 1e-3, v, mask, 1e4)
    assert torch.isfinite(out).all()
