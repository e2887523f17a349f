"""The accuracy criterion of flashsloth_kernels.testing is not loose: one planted bug per kind
(a dropped term, an off-by-one, a 16-bit intermediate, a wrong gradient gate) in each op, each
small enough to pass a careless tolerance, fails it; the correct computation passes it."""

import math

import pytest
import torch
from test_attention import check_attention, make_inputs as attn_inputs
from test_sap import check_sap, loop_sap, make_inputs as sap_inputs

from flashsloth_kernels.attention.reference import (attn_reference_bwd,
                                                    query_patch_attention_reference)
from flashsloth_kernels.testing import assert_close, tolerance

# ---------------------------------------------------------------- the criterion itself


def test_bound_scales_with_the_baseline_and_the_floor():
    e = torch.tensor([1.0, -2.0], dtype=torch.float64)
    b = e + torch.tensor([1e-6, 0.0], dtype=torch.float64)
    t = tolerance(e, b, torch.float32, magnitude=3.0, n=16, k=4.0)
    eps = torch.finfo(torch.float32).eps
    assert t == pytest.approx(4.0 * 1e-6 + eps * 2.0 + 2.0 * eps * (2.0 + 3.0 * 4.0))
    # 16-bit inputs: the final rounding is the input dtype's, the accumulation fp32's
    t16 = tolerance(e, e, torch.bfloat16, magnitude=3.0, n=16)
    assert t16 == pytest.approx(torch.finfo(torch.bfloat16).eps * 2.0 + 2.0 * eps * (2.0 + 3.0 * 4.0))


def test_non_finite_and_shape_mismatch_fail():
    e = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close("t", torch.tensor([1.0, math.nan, 1.0]), e, e.float(), torch.float32)
    with pytest.raises(AssertionError, match="shape"):
        assert_close("t", torch.ones(2), e, e.float(), torch.float32)
    with pytest.raises(AssertionError, match="the reference is not finite"):
        assert_close("t", torch.ones(3), e * math.inf, e.float(), torch.float32)


# ---------------------------------------------------------------- SAP planted bugs

SAP_CASE = dict(B=2, H=9, W=8, C=32, Ch=24)   # 3x3 windows, partial edge windows
KH = KW = 3


def _sap_variant(x, w1, b1, w2, b2, bug):
    """SAP in fp32 with one planted bug (None: correct)."""
    B, N, C = x.shape
    H, W = SAP_CASE["H"], SAP_CASE["W"]
    grid = x.reshape(B, H, W, C)
    z = grid @ w1.t() + b1
    if bug == "16-bit hidden activations":          # z rounded to bfloat16 before the relu
        z = z + (z.detach().bfloat16().float() - z.detach())
    a = torch.relu(z)
    if bug == "relu gate without b1":               # backward gates on x W1^T, not on z
        gate = (grid @ w1.t()).detach() > 0
        a = torch.relu(z).detach() + (z - z.detach()) * gate
    s = (a @ w2.reshape(-1, 1)).squeeze(-1) + b2.reshape(())
    tokens = []
    for i in range(0, H, KH):
        for j in range(0, W, KW):
            win_x = grid[:, i:i + KH, j:j + KW].reshape(B, -1, C)
            alpha = torch.softmax(s[:, i:i + KH, j:j + KW].reshape(B, -1), dim=-1)
            if bug == "dropped window term":        # last patch of each window left out of the sum
                alpha, win_x = alpha[:, :-1], win_x[:, :-1]
            tokens.append((alpha.unsqueeze(-1) * win_x).sum(1))
    return torch.stack(tokens, dim=1)


def _sap_check(bug):
    x, w1, b1, w2, b2 = sap_inputs(**SAP_CASE)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    out = _sap_variant(*leaves, bug)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    check_sap(out.detach(), grads, (x, w1, b1, w2, b2), g, KH, KW, SAP_CASE["H"], SAP_CASE["W"])


def test_sap_correct_formula_passes():
    _sap_check(None)


@pytest.mark.parametrize("bug", ["dropped window term", "16-bit hidden activations",
                                 "relu gate without b1"])
def test_sap_planted_bug_is_caught(bug):
    with pytest.raises(AssertionError):
        _sap_check(bug)


def test_sap_variant_matches_the_loop():
    """The harness of the planted bugs is the original loop when no bug is planted."""
    x, w1, b1, w2, b2 = (t.double() for t in sap_inputs(**SAP_CASE))
    torch.testing.assert_close(_sap_variant(x, w1, b1, w2, b2, None),
                               loop_sap(x, w1, b1, w2, b2, KH, KW, SAP_CASE["H"], SAP_CASE["W"]))


# ---------------------------------------------------------------- attention planted bugs

ATTN_CASE = (2, 4, 9, 729, 18, 36)   # EmbQ-like: 9 queries, 729 keys


def _drop_last_key(mask, B, Lk):
    m = torch.ones(B, Lk, dtype=torch.bool) if mask is None else mask.clone()
    for b in range(B):
        idx = m[b].nonzero()
        if idx.numel():
            m[b, idx[-1, 0]] = False
    return m


def _attn_variant(q, k, v, mask, g, bug):
    """(out, (dq, dk, dv), lse) in fp32 with one planted bug (None: correct)."""
    B, Lk, Dk = q.shape[0], k.shape[2], q.shape[3]
    scale = Dk ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if bug == "off-by-one key":                     # the last attended key is never seen
        out, lse = query_patch_attention_reference(*leaves, _drop_last_key(mask, B, Lk), scale)
    elif bug == "16-bit pre-scaled q":             # q * scale rounded to bfloat16
        qs = (leaves[0] * scale).bfloat16().float()
        out, lse = query_patch_attention_reference(qs, leaves[1], leaves[2], mask, 1.0)
    else:
        out, lse = query_patch_attention_reference(*leaves, mask, scale)
    if bug == "softmax shift added back in bf16":   # lse = log sum exp(s - m) + bf16(m)
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], -math.inf)
        m = s.amax(-1)
        m = torch.where(torch.isfinite(m), m, 0)
        lse = lse - m + m.bfloat16().float()
    if bug == "delta from a 16-bit out":            # backward: rowsum(dO * out) with out in fp16
        grads = attn_reference_bwd(g, q, k, v, mask, scale, out.detach().half().float(), lse.detach())
    else:
        grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads, lse.detach()


def _attn_check(bug, mask_mode="mask"):
    q, k, v, mask = attn_inputs(*ATTN_CASE, mask_mode=mask_mode)
    g = torch.randn(*ATTN_CASE[:3], ATTN_CASE[5])
    out, grads, lse = _attn_variant(q, k, v, mask, g, bug)
    check_attention(out, grads, q, k, v, mask, g, lse=lse)


@pytest.mark.parametrize("mask_mode", ["none", "mask"])
def test_attention_correct_formula_passes(mask_mode):
    _attn_check(None, mask_mode)


@pytest.mark.parametrize("bug", ["off-by-one key", "16-bit pre-scaled q", "softmax shift added back in bf16",
                                 "delta from a 16-bit out"])
def test_attention_planted_bug_is_caught(bug):
    with pytest.raises(AssertionError):
        _attn_check(bug)
