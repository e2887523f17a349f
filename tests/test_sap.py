"""Spatial attention pooling: every backend against the reference, the reference against a
plain loop, registration (opcheck, torch.compile, FLOP counting), numerics and bad input."""

import math

import pytest
import torch
from conftest import backend_devices
from torch.utils.flop_counter import FlopCounterMode

import flashsloth_kernels as fk
from flashsloth_kernels import BackendUnavailableError, SpatialAttentionPool, spatial_attention_pool
from flashsloth_kernels.sap import op as sap_op
from flashsloth_kernels.sap import reference as sap_ref
from flashsloth_kernels.sap.reference import sap_reference
from flashsloth_kernels.testing import assert_close, term_size

SAP = torch.ops.flashsloth.spatial_attention_pool


def make_inputs(B, H, W, C, Ch, dtype=torch.float32, device="cpu", bias=True, score_scale=3.0):
    """Random SAP inputs whose scores spread over a few units, so the softmax is not flat."""
    x = torch.randn(B, H * W, C)
    w1 = torch.randn(Ch, C) * C ** -0.5
    b1 = torch.randn(Ch) * 0.1 if bias else None
    w2 = torch.randn(1, Ch) * score_scale * Ch ** -0.5
    b2 = torch.randn(1) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(t) for t in (x, w1, b1, w2, b2)]


def loop_sap(x, w1, b1, w2, b2, kh, kw, H, W, mask=None, scale=1.0):
    """The original code's formulation: a Python loop over windows, slicing the grid."""
    B, N, C = x.shape
    grid = x.reshape(B, H, W, C)
    z = grid @ w1.t() + (0 if b1 is None else b1)
    a = torch.relu(z)
    if mask is not None:
        a = a * mask.reshape(B, H, W, -1) * scale
    s = (a @ w2.reshape(-1, 1)).squeeze(-1) + (0 if b2 is None else b2.reshape(()))
    tokens = []
    for i in range(0, H, kh):
        for j in range(0, W, kw):
            win_x = grid[:, i:i + kh, j:j + kw].reshape(B, -1, C)
            alpha = torch.softmax(s[:, i:i + kh, j:j + kw].reshape(B, -1), dim=-1)
            tokens.append((alpha.unsqueeze(-1) * win_x).sum(1))
    return torch.stack(tokens, dim=1)


# (B, H, W, C, Ch, window): grids 1x1, 2x5, 7x7, 27x27 and non-square, windows 1, 2, 3, 4,
# (2, 3), partial edge windows, C in {8, 72, 1152}, B in {0, 1, 3}.
CASES = [
    (1, 1, 1, 8, 8, 1),
    (3, 2, 5, 8, 16, (2, 3)),
    (3, 7, 7, 72, 72, 3),
    (1, 7, 7, 8, 12, 4),
    (3, 7, 5, 72, 40, 2),
    (1, 5, 7, 72, 72, (2, 3)),
    (0, 7, 7, 8, 8, 3),
    (3, 27, 27, 8, 8, 3),
    (2, 2, 5, 1152, 1152, 2),
    (1, 27, 27, 1152, 1152, 3),
]
SMALL = [c for c in CASES if c[3] <= 72 and c[1] * c[2] <= 49]


def case_id(c):
    B, H, W, C, Ch, k = c
    k = f"{k[0]}x{k[1]}" if isinstance(k, tuple) else k
    return f"B{B}-H{H}-W{W}-C{C}-Ch{Ch}-k{k}"


def _window(k):
    return k if isinstance(k, tuple) else (k, k)


def _run(backend, inputs, window, grid, grad, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = spatial_attention_pool(*leaves, window=window, grid_size=grid, backend=backend, **kw)
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, present, grad)


GRAD_NAMES = ("dx", "dw1", "db1", "dw2", "db2")


def _mean_term(a, b, n):
    """max over outputs of the mean absolute term of the sum a @ b (n terms)."""
    return float((torch.matmul(a, b) / max(1, n)).max()) if a.numel() and b.numel() else 0.0


def sap_terms(x, w1, b1, w2, b2, g, kh, kw, H, W, mask=None, scale=1.0):
    """name -> (size of one summed term, reduction length) of each SAP output, from the float64
    intermediates (the accumulation floor of flashsloth_kernels.testing): the largest mean
    absolute term of a sum, with the errors its factors carry in."""
    x, w1, w2, g = (t.detach().double() for t in (x, w1, w2.reshape(-1), g))
    b1 = None if b1 is None else b1.detach().double()
    b2 = None if b2 is None else b2.detach().double().reshape(1)
    B, N, C = x.shape
    Ch = w1.shape[0]
    rows = B * N
    if B == 0:
        return {name: (0.0, 1) for name in ("out",) + GRAD_NAMES}
    z, a, s = sap_ref._scores(x, w1, b1, w2, b2, mask, scale)
    win = sap_ref._patch_window_index(H, W, kh, kw, x.device)
    alpha = sap_ref._from_windows(torch.softmax(sap_ref._to_windows(
        s.unsqueeze(-1), H, W, kh, kw, -math.inf).squeeze(-1), -1), H, W, kh, kw)
    # exp turns an absolute error of a score (its terms w2_k a_k) into a relative error of alpha
    E = max(1.0, float(s.abs().max()), float((a.abs() @ w2.abs()).max()) / math.sqrt(Ch))
    ax = torch.zeros(B, g.shape[1], C, dtype=torch.float64).index_add_(1, win, alpha[..., None] * x.abs())
    dalpha = (g[:, win] * x).sum(-1)
    inner = torch.zeros(B, g.shape[1], dtype=torch.float64).index_add_(1, win, alpha * dalpha)
    ds = alpha * (dalpha - inner[:, win])
    dsa = ds.abs() * E + alpha * (g[:, win].abs() * x.abs()).sum(-1)     # (B, N)
    gate = (z > 0).double() * (1 if mask is None else mask * scale)
    dza = dsa.unsqueeze(-1) * w2.abs() * gate                              # (B, N, Ch)
    flat = dza.reshape(rows, Ch)
    return {
        "out": (float(ax.max()) * E / (kh * kw), kh * kw),
        "dx": (_mean_term(flat, w1.abs(), Ch), Ch),
        "dw1": (_mean_term(flat.t(), x.abs().reshape(rows, C), rows), rows),
        "db1": (float(flat.sum(0).max()) / rows, rows),
        "dw2": (float((dsa.reshape(rows, 1) * a.abs().reshape(rows, Ch)).sum(0).max()) / rows, rows),
        "db2": (float(dsa.sum()) / rows, rows),
    }


def check_sap(out, grads, inputs, grad, kh, kw, H, W, mask=None, scale=1.0, names=GRAD_NAMES):
    """Compare a backend's (out, grads) for ``inputs`` (None entries for absent biases; grads
    for the tensors of ``names``) with the float64 reference, the baseline being the reference
    at the inputs' precision (flashsloth_kernels.testing's criterion)."""
    dtype = inputs[0].dtype

    def run(ts, gr):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
        o = sap_reference(*leaves, kh, kw, H, W, mask, scale)
        wanted = [t for t, n in zip(leaves, GRAD_NAMES) if t is not None and n in names]
        if not wanted:
            return o, []
        return o, torch.autograd.grad(o, wanted, gr) if o.numel() else [torch.zeros_like(t) for t in wanted]

    ins = list(inputs)
    ins[3] = ins[3].reshape(-1)
    ref_out, ref_grads = run([None if t is None else t.double() for t in ins], grad.double())
    base_out, base_grads = run(ins, grad)
    terms = sap_terms(*ins, grad, kh, kw, H, W, mask, scale)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close("out", out, ref_out, base_out, dtype, magnitude=terms["out"][0], n=terms["out"][1])
    present = [n for n, t in zip(GRAD_NAMES, inputs) if t is not None and n in names]
    assert len(grads) == len(present)
    for name, g, r, b in zip(present, grads, ref_grads, base_grads):
        assert g.numel() == r.numel(), name
        assert_close(name, g.reshape(r.shape), r, b, dtype, magnitude=terms[name][0], n=terms[name][1])


def check_against_reference(backend, device, case, dtype, bias=True):
    B, H, W, C, Ch, k = case
    kh, kw = _window(k)
    inputs = make_inputs(B, H, W, C, Ch, dtype, device, bias=bias)
    G = math.ceil(H / kh) * math.ceil(W / kw)
    grad = torch.randn(B, G, C, device=device, dtype=dtype)
    out, grads = _run(backend, inputs, k, (H, W), grad)
    assert out.dtype == dtype and out.shape == (B, G, C)
    for g, t in zip(grads, [t for t in inputs if t is not None]):
        assert g.dtype == t.dtype and g.shape == t.shape
    check_sap(out.cpu(), [g.cpu() for g in grads], [None if t is None else t.cpu() for t in inputs],
              grad.cpu(), kh, kw, H, W)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backend_matches_reference_fp32(backend, device, case):
    if backend == "triton" and device == "cpu" and case not in SMALL:
        pytest.skip("the Triton interpreter is too slow for this size; covered on GPU")
    check_against_reference(backend, device, case, torch.float32)


LOW_PRECISION_CASES = [(3, 7, 7, 72, 72, 3), (3, 7, 5, 72, 40, 2), (1, 2, 5, 1152, 1152, 2)]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=case_id)
def test_backend_matches_reference_low_precision(backend, device, dtype, case):
    if backend == "triton" and device == "cpu":
        if dtype == torch.bfloat16:
            pytest.skip("Triton's interpreter computes bf16 wrongly; bf16 is tested on GPU")
        if case not in SMALL:
            pytest.skip("the Triton interpreter is too slow for this size; covered on GPU")
    check_against_reference(backend, device, case, dtype)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_no_bias(backend, device):
    check_against_reference(backend, device, (2, 5, 7, 8, 16, (2, 3)), torch.float32, bias=False)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("need", ["x-only", "weights-only", "both"])
def test_dropout_mask_and_partial_grads(backend, device, need):
    """With a fixed dropout mask the op matches the reference; the backward uses that mask,
    and gradients are computed for exactly the inputs that need them."""
    B, H, W, C, Ch, (kh, kw) = 2, 5, 7, 8, 12, (2, 3)
    x, w1, b1, w2, b2 = make_inputs(B, H, W, C, Ch, device=device)
    w2 = w2.reshape(Ch)
    mask = torch.rand(B, H * W, Ch, device=device) >= 0.3
    scale = 1 / 0.7
    req = {"x-only": (True, False), "weights-only": (False, True), "both": (True, True)}[need]
    tensors = [x.clone().requires_grad_(req[0])] + [t.clone().requires_grad_(req[1]) for t in (w1, b1, w2, b2)]
    out = SAP(*tensors, kh, kw, H, W, mask, scale, backend)
    G = math.ceil(H / kh) * math.ceil(W / kw)
    grad = torch.randn(B, G, C, device=device)
    wanted = [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad)
    names = [n for n, t in zip(GRAD_NAMES, tensors) if t.requires_grad]
    check_sap(out.cpu(), [g.cpu() for g in grads], [t.detach().cpu() for t in tensors], grad.cpu(),
              kh, kw, H, W, mask.cpu(), scale, names=names)


def test_public_dropout_uses_one_mask_for_forward_and_backward():
    B, H, W, C, Ch, p = 2, 6, 6, 8, 8, 0.4
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in make_inputs(B, H, W, C, Ch)]
    torch.manual_seed(123)
    out = spatial_attention_pool(x, w1, b1, w2, b2, dropout_p=p)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w1, b1, w2, b2), g)
    torch.manual_seed(123)
    mask = torch.empty(B, H * W, Ch, dtype=torch.bool).bernoulli_(1 - p)
    check_sap(out, grads, (x, w1, b1, w2, b2), g, 3, 3, H, W, mask, 1 / (1 - p))
    # and dropout really drops: without it the output differs
    assert not torch.allclose(out, spatial_attention_pool(x, w1, b1, w2, b2))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout"])
def test_gradcheck_float64(backend, with_mask):
    B, H, W, C, Ch, kh, kw = 2, 4, 5, 3, 5, 2, 3
    x, w1, b1, w2, b2 = make_inputs(B, H, W, C, Ch, torch.float64)
    w2 = w2.reshape(Ch)
    mask = (torch.rand(B, H * W, Ch) >= 0.25) if with_mask else None
    args = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    fn = lambda *a: SAP(*a, kh, kw, H, W, mask, 1 / 0.75 if with_mask else 1.0, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", [(2, 7, 7, 5, 6, 3), (1, 5, 7, 4, 4, (2, 3)), (3, 1, 1, 2, 3, 1)],
                         ids=case_id)
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout"])
def test_reference_equals_window_loop(case, with_mask):
    B, H, W, C, Ch, k = case
    kh, kw = _window(k)
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in make_inputs(B, H, W, C, Ch, torch.float64)]
    mask = (torch.rand(B, H * W, Ch) >= 0.3) if with_mask else None
    scale = 1 / 0.7 if with_mask else 1.0
    ref = sap_reference(x, w1, b1, w2.reshape(Ch), b2, kh, kw, H, W, mask, scale)
    loop = loop_sap(x, w1, b1, w2, b2, kh, kw, H, W, mask, scale)
    g = torch.randn_like(ref)
    terms = sap_terms(x, w1, b1, w2, b2, g, kh, kw, H, W, mask, scale)
    # both float64: the bound is the floor (the loop is its own baseline)
    assert_close("out", ref, loop, loop, torch.float64, magnitude=terms["out"][0], n=terms["out"][1])
    for name, a, b in zip(GRAD_NAMES,
                          torch.autograd.grad(ref, (x, w1, b1, w2, b2), g),
                          torch.autograd.grad(loop, (x, w1, b1, w2, b2), g)):
        assert_close(name, a, b.reshape(a.shape), b.reshape(a.shape), torch.float64,
                     magnitude=terms[name][0], n=terms[name][1])


# (H, W, window): windows larger than the grid in one or both directions
BIG_WINDOWS = [(1, 1, 3), (2, 5, 3), (2, 5, 4), (2, 5, (1, 7)), (3, 2, (5, 1))]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("H,W,window", BIG_WINDOWS, ids=lambda v: str(v).replace(" ", ""))
def test_window_larger_than_grid_gives_partial_windows(backend, device, H, W, window):
    """The original loop's rule: a window larger than the grid holds the patches that exist.
    Through the public function (which clamps the window to the grid) and through the
    registered op with the window unclamped, against the loop and the float64 reference."""
    B, C, Ch = 2, 8, 12
    kh, kw = _window(window)
    x, w1, b1, w2, b2 = make_inputs(B, H, W, C, Ch, device=device)
    G = math.ceil(H / kh) * math.ceil(W / kw)
    loop = loop_sap(*(t.cpu().double() for t in (x, w1, b1, w2, b2)), kh, kw, H, W)
    assert loop.shape == (B, G, C)
    out = spatial_attention_pool(x, w1, b1, w2, b2, window, (H, W), backend=backend)
    assert out.shape == (B, G, C)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2.reshape(Ch), b2)]
    raw = SAP(*leaves, kh, kw, H, W, None, 1.0, backend)
    g = torch.randn_like(raw)
    # the public function (clamped window): forward only
    check_sap(out.cpu(), [], [t.detach().cpu() for t in leaves], g.cpu(), kh, kw, H, W, names=())
    grads = torch.autograd.grad(raw, leaves, g)
    check_sap(raw.cpu(), [t.cpu() for t in grads], [t.detach().cpu() for t in leaves], g.cpu(),
              kh, kw, H, W)
    # the float64 reference is the loop
    ref = sap_reference(*(t.detach().cpu().double() for t in leaves), kh, kw, H, W)
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_extreme_scores_stay_finite(backend, device):
    """Scores of +-1e4: the window softmax subtracts its max, so no inf or NaN."""
    B, H, W, C, Ch = 2, 6, 6, 8, 8
    x, w1, b1, w2, b2 = make_inputs(B, H, W, C, Ch, device=device)
    w2 = torch.sign(torch.randn(1, Ch, device=device)) * 1e4
    x = x.requires_grad_()
    out = spatial_attention_pool(x, w1, b1, w2, b2, backend=backend)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    check_sap(out.cpu(), [dx.cpu()], [t.detach().cpu() for t in (x, w1, b1, w2, b2)], g.cpu(),
              3, 3, H, W, names=("dx",))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_layouts_and_non_contiguous(backend, device):
    """(B, H, W, C) input equals (B, N, C); transposed / strided views give the same result."""
    B, H, W, C, Ch = 2, 5, 7, 8, 12
    x, w1, b1, w2, b2 = make_inputs(B, H, W, C, Ch, device=device)
    base = spatial_attention_pool(x, w1, b1, w2, b2, 2, (H, W), backend=backend)
    grid = spatial_attention_pool(x.reshape(B, H, W, C), w1, b1, w2, b2, 2, backend=backend)
    torch.testing.assert_close(grid, base)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)          # strided batch
    w1_nc = w1.t().contiguous().t()                                  # column-major weight
    w2_nc = torch.stack([w2.reshape(Ch), w2.reshape(Ch)], 1)[:, :1].t()  # (1, Ch) with stride 2
    b1_nc = torch.stack([b1, b1], 1)[:, 0]
    assert not (x_nc.is_contiguous() or w1_nc.is_contiguous() or b1_nc.is_contiguous())
    out = spatial_attention_pool(x_nc, w1_nc, b1_nc, w2_nc, b2.reshape(()), 2, (H, W), backend=backend)
    torch.testing.assert_close(out, base)


def test_empty_batch_returns_empty_and_zero_grads():
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in make_inputs(0, 7, 7, 8, 8)]
    out = spatial_attention_pool(x, w1, b1, w2, b2)
    assert out.shape == (0, 9, 8)
    grads = torch.autograd.grad(out.sum(), (x, w1, b1, w2, b2))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (x, w1, b1, w2, b2)))


def test_opcheck():
    x, w1, b1, w2, b2 = make_inputs(2, 5, 5, 8, 6)
    for backend in ("reference", "cpu"):
        args = (x.requires_grad_(), w1.requires_grad_(), b1, w2.reshape(6), b2, 2, 2, 5, 5, None, 1.0, backend)
        torch.library.opcheck(SAP.default, args)
        mask = torch.rand(2, 25, 6) > 0.5
        torch.library.opcheck(SAP.default, args[:9] + (mask, 2.0, backend))
        # strided inputs: the fake backward must report the layout the kernels return
        x_nc = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
        w1_nc = w1.detach().t().contiguous().t().requires_grad_()
        torch.library.opcheck(SAP.default, (x_nc, w1_nc) + args[2:])
        grad = torch.randn(2, 9, 8)
        torch.library.opcheck(torch.ops.flashsloth.spatial_attention_pool_backward.default,
                              (grad, x_nc.detach(), w1_nc.detach()) + args[2:] + (True, True))


def test_torch_compile_fullgraph():
    pool = SpatialAttentionPool(16, window=(2, 3), dropout=0.0)
    x = torch.randn(2, 7, 5, 16, requires_grad=True)
    eager = pool(x)
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    (g_c,) = torch.autograd.grad(out.sum(), x)
    (g_e,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(g_c, g_e)


def test_flop_counter_counts_forward_and_backward():
    B, H, W, C, Ch = 2, 9, 9, 16, 24
    N = H * W
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in make_inputs(B, H, W, C, Ch)]
    with FlopCounterMode(display=False) as counter:
        out = spatial_attention_pool(x, w1, b1, w2, b2)
    assert counter.get_total_flops() == 2 * B * N * C * Ch + 2 * B * N * Ch + 2 * B * N * C
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    # recompute (GEMM + scores + dalpha), dW1 + dw2, dx (GEMM + direct term)
    expected = (2 * B * N * C * Ch + 2 * B * N * Ch + 2 * B * N * C) + (2 * B * N * C * Ch + 2 * B * N * Ch) \
        + (2 * B * N * C * Ch + 2 * B * N * C)
    assert counts[torch.ops.flashsloth.spatial_attention_pool_backward] == expected


def test_module_loads_original_state_dict():
    """Keys of the original checkpoint (model.pooling.mlp.*) load with the prefix stripped."""
    C = 24
    original = {
        "model.pooling.mlp.0.weight": torch.randn(C, C),
        "model.pooling.mlp.0.bias": torch.randn(C),
        "model.pooling.mlp.3.weight": torch.randn(1, C),
        "model.pooling.mlp.3.bias": torch.randn(1),
    }
    pool = SpatialAttentionPool(C).eval()
    state = {k.removeprefix("model.pooling."): v for k, v in original.items()}
    assert set(pool.state_dict()) == set(state)
    pool.load_state_dict(state)
    x = torch.randn(2, 36, C)
    ref = sap_reference(x, state["mlp.0.weight"], state["mlp.0.bias"], state["mlp.3.weight"].reshape(C),
                        state["mlp.3.bias"], 3, 3, 6, 6)
    torch.testing.assert_close(pool(x), ref)
    assert sum(p.numel() for p in SpatialAttentionPool(1152).parameters()) == 1_329_409


def test_module_dropout_only_in_training():
    pool = SpatialAttentionPool(8, dropout=0.5)
    x = torch.randn(2, 36, 8)
    pool.eval()
    torch.testing.assert_close(pool(x), pool(x))
    pool.train()
    torch.manual_seed(1)
    a = pool(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, pool(x))


def test_auto_prefers_cpu_backend_on_cpu():
    if sap_op.dispatcher.reasons("cpu", torch.device("cpu"), torch.float32):
        pytest.fail("the C++ extension is not built: " +
                    "; ".join(sap_op.dispatcher.reasons("cpu", torch.device("cpu"), torch.float32)))
    assert sap_op.dispatcher.select("auto", torch.device("cpu"), torch.float32) == "cpu"


def test_backend_env_var_and_explicit_backend_errors(monkeypatch):
    x, w1, b1, w2, b2 = make_inputs(1, 3, 3, 4, 4)
    monkeypatch.setenv("FLASHSLOTH_BACKEND", "reference")
    assert sap_op.dispatcher.select(None, x.device, x.dtype) == "reference"
    monkeypatch.setenv("FLASHSLOTH_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FLASHSLOTH_BACKEND"):
        spatial_attention_pool(x, w1, b1, w2, b2)
    monkeypatch.delenv("FLASHSLOTH_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="float64"):
        spatial_attention_pool(*[t.double() for t in (x, w1, b1, w2, b2)], backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="Triton needs CUDA tensors"):
        spatial_attention_pool(x, w1, b1, w2, b2, backend="triton")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        spatial_attention_pool(x, w1, b1, w2, b2, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        spatial_attention_pool(x, w1, b1, w2, b2, backend="gpu")


GOOD = dict(B=2, H=6, W=6, C=8, Ch=12)


def _good():
    return make_inputs(**GOOD)


BAD_INPUTS = {
    "x-rank": (lambda x, w1, b1, w2, b2: dict(x=x[0]), ValueError, "x: expected a 3-D or 4-D"),
    "x-not-tensor": (lambda x, w1, b1, w2, b2: dict(x=x.tolist()), TypeError, "x: expected a torch.Tensor"),
    "x-int-dtype": (lambda x, w1, b1, w2, b2: dict(x=x.long()), TypeError, "x: expected a floating-point"),
    "C-mismatch": (lambda x, w1, b1, w2, b2: dict(w1=w1[:, :5]), ValueError, r"w1: expected shape \(Ch, C\)"),
    "w1-rank": (lambda x, w1, b1, w2, b2: dict(w1=w1[0]), ValueError, "w1: expected a 2-D"),
    "b1-shape": (lambda x, w1, b1, w2, b2: dict(b1=b1[:5]), ValueError, r"b1: expected shape \(12\)"),
    "w2-shape": (lambda x, w1, b1, w2, b2: dict(w2=w2[:, :5]), ValueError, r"w2: expected shape \(1, 12\)"),
    "b2-shape": (lambda x, w1, b1, w2, b2: dict(b2=torch.zeros(2)), ValueError, r"b2: expected shape \(1,\)"),
    "dtype-mismatch": (lambda x, w1, b1, w2, b2: dict(w1=w1.double()), TypeError, "w1: expected dtype torch.float32"),
    "device-mismatch": (lambda x, w1, b1, w2, b2: dict(b2=b2.to("meta")), ValueError, "b2: expected a tensor on x's device"),
    "not-square": (lambda x, w1, b1, w2, b2: dict(x=x[:, :35]), ValueError, "N = 35 .* not a perfect square"),
    "grid-mismatch": (lambda x, w1, b1, w2, b2: dict(grid_size=(4, 8)), ValueError, r"H \* W = 4 \* 8 = 32 must equal N = 36"),
    "grid-vs-4d": (lambda x, w1, b1, w2, b2: dict(x=x.reshape(2, 6, 6, 8), grid_size=(4, 9)), ValueError, r"grid_size: got \(4, 9\)"),
    "window-zero": (lambda x, w1, b1, w2, b2: dict(window=0), ValueError, "window: expected an int >= 1"),
    "grid-int-vs-4d": (lambda x, w1, b1, w2, b2: dict(x=x.reshape(2, 6, 6, 8), grid_size=5), ValueError, r"grid_size: got 5 but x of shape \(2, 6, 6, 8\) is a \(6, 6\) grid"),
    "grid-float": (lambda x, w1, b1, w2, b2: dict(grid_size=6.0), TypeError, "grid_size: expected an int or a pair"),
    "window-type": (lambda x, w1, b1, w2, b2: dict(window=2.5), TypeError, "window: expected an int"),
    "window-triple": (lambda x, w1, b1, w2, b2: dict(window=(1, 2, 3)), ValueError, "window: expected an int or a pair"),
    "dropout-one": (lambda x, w1, b1, w2, b2: dict(dropout_p=1.0), ValueError, r"dropout_p: expected a float in \[0, 1\)"),
    "dropout-negative": (lambda x, w1, b1, w2, b2: dict(dropout_p=-0.1), ValueError, "dropout_p"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name):
    make_kwargs, exc, pattern = BAD_INPUTS[name]
    x, w1, b1, w2, b2 = _good()
    kwargs = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    kwargs.update(make_kwargs(x, w1, b1, w2, b2))
    with pytest.raises(exc, match=pattern):
        spatial_attention_pool(**kwargs)


def test_package_exports():
    assert fk.spatial_attention_pool is spatial_attention_pool
    assert fk.SpatialAttentionPool is SpatialAttentionPool


def test_cpu_deterministic_across_thread_counts():
    """Run to run bitwise; across thread counts bitwise for every output but dW1 (a library
    GEMM's reduction split may follow the thread count, see sap/fused_cpu.py), which must
    still meet the accuracy criterion."""
    B, H, W, C, Ch = 3, 27, 27, 72, 72
    inputs = make_inputs(B, H, W, C, Ch)
    grad = torch.randn(B, 81, C)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            out, grads = _run("cpu", inputs, 3, (H, W), grad)
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[3])), "not reproducible run to run"
    for other in results[1:3]:
        for name, a, b in zip(("out",) + GRAD_NAMES, results[0], other):
            if name != "dw1":
                assert torch.equal(a, b), name
    check_sap(results[2][0], list(results[2][1:]), inputs, grad, 3, 3, H, W)


def test_cpu_isa_variants_match_reference(monkeypatch):
    """The CPU kernel's elementwise passes are compiled per instruction set (csrc/common/
    cpu_isa.h); FLASHSLOTH_CPU_ISA forces each variant this CPU runs, and every one meets the
    criterion on odd shapes (C, Ch not multiples of any vector width, partial edge windows),
    with a dropout mask, with 16-bit inputs, and keeps a NaN patch inside its own window."""
    from flashsloth_kernels.sap import fused_cpu

    supported = fused_cpu.supported_isas()
    assert supported and supported[-1] == "baseline"
    B, H, W, C, Ch, (kh, kw) = 2, 5, 7, 37, 23, (2, 3)
    G = math.ceil(H / kh) * math.ceil(W / kw)
    try:
        for isa in supported:
            monkeypatch.setenv("FLASHSLOTH_CPU_ISA", isa)
            assert fused_cpu.isa() == isa
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                check_against_reference("cpu", "cpu", (B, H, W, C, Ch, (kh, kw)), dtype)
            x, w1, b1, w2, b2 = make_inputs(B, H, W, C, Ch)
            mask = torch.rand(B, H * W, Ch) >= 0.3
            grad = torch.randn(B, G, C)
            leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2.reshape(Ch), b2)]
            out = SAP(*leaves, kh, kw, H, W, mask, 1 / 0.7, "cpu")
            grads = torch.autograd.grad(out, leaves, grad)
            check_sap(out, list(grads), [x, w1, b1, w2, b2], grad, kh, kw, H, W, mask, 1 / 0.7)
            x[1, 3 * W + 4, 5] = math.nan  # patch (3, 4): window (1, 1) of image 1
            out = spatial_attention_pool(x, w1, b1, w2, b2, (kh, kw), (H, W), backend="cpu")
            bad = torch.zeros(B, G, dtype=torch.bool)
            bad[1, 1 * math.ceil(W / kw) + 1] = True
            assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
        monkeypatch.setenv("FLASHSLOTH_CPU_ISA", "auto")
        assert fused_cpu.isa() == supported[0]
        missing = [i for i in ("avx512bf16", "avx512", "avx2") if i not in supported]
        if missing:
            monkeypatch.setenv("FLASHSLOTH_CPU_ISA", missing[0])
            with pytest.raises(ValueError, match="cannot run that variant"):
                spatial_attention_pool(*make_inputs(1, 3, 3, 4, 4), 3, backend="cpu")
    finally:
        monkeypatch.delenv("FLASHSLOTH_CPU_ISA", raising=False)
        fused_cpu.isa()  # back to auto


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [(2, 17, 17, 38, 70, 3), (1, 6, 7, 37, 65, (2, 3)),
                                  (3, 9, 9, 64, 128, 4)], ids=case_id)
def test_cpu_16bit_forward_gemm_tails(dtype, case):
    """16-bit x: where oneDNN's brgemm micro-kernel is available the forward's z = x W1^T runs on
    it with an fp32 output (csrc/sap/sap_cpu.cpp, gemm_lowp_f32), in tiles of 32 x 64 over tasks
    of 256 rows; shapes with partial row tiles, partial column blocks (Ch = 70, 65) and an odd
    C (the fp32 fallback) meet the criterion, forward and backward."""
    check_against_reference("cpu", "cpu", case, dtype)
