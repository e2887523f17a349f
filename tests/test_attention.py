"""Query-to-patch attention: every backend against the float64 reference (forward and the
gradients of q, k, v), the reference against a per-head loop, registration (opcheck,
torch.compile, FLOP counting), masking edge cases, determinism and bad input."""

import itertools
import math

import pytest
import torch
from conftest import backend_devices
from torch.utils.flop_counter import FlopCounterMode

import flashsloth_kernels as fk
from flashsloth_kernels import BackendUnavailableError, query_patch_attention
from flashsloth_kernels.attention import op as attn_op
from flashsloth_kernels.attention.reference import (attn_reference_bwd, attn_reference_fwd,
                                                    query_patch_attention_reference)
from flashsloth_kernels.testing import assert_close, term_size

ATTN = torch.ops.flashsloth.query_patch_attention
ATTN_BWD = torch.ops.flashsloth.query_patch_attention_backward

MASK_MODES = ("none", "mask")


def make_mask(B, Lk, device="cpu"):
    """Random key padding (~30% masked); sample 0 keeps key 0, sample 1 has every key masked."""
    mask = torch.rand(B, Lk, device=device) > 0.3
    mask[0, 0] = True
    if B > 1:
        mask[1] = False
    return mask


def make_inputs(B, H, Lq, Lk, Dk, Dv, dtype=torch.float32, device="cpu", mask_mode="none"):
    q = torch.randn(B, H, Lq, Dk, dtype=dtype, device=device)
    k = torch.randn(B, H, Lk, Dk, dtype=dtype, device=device)
    v = torch.randn(B, H, Lk, Dv, dtype=dtype, device=device)
    mask = make_mask(B, Lk, device) if mask_mode == "mask" else None
    return q, k, v, mask


def case_id(case):
    B, H, Lq, Lk, (Dk, Dv), mask_mode = case
    return f"B{B}-H{H}-Lq{Lq}-Lk{Lk}-d{Dk}x{Dv}-{mask_mode}"


def _run(backend, q, k, v, mask, grad, scale=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = query_patch_attention(*leaves, mask, scale, backend=backend)
    return out, torch.autograd.grad(out, leaves, grad)


def _oracle(q, k, v, mask, grad, scale=None, dtype=torch.float64):
    """Autograd through the differentiable reference, in ``dtype`` (float64: the oracle; the
    inputs' dtype: the plain-PyTorch baseline of flashsloth_kernels.testing's criterion)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = query_patch_attention_reference(*leaves, mask, scale)
    return out, torch.autograd.grad(out, leaves, grad.to(dtype)), lse


def attn_terms(q, k, v, mask, grad, scale=None):
    """name -> (size of one summed term, reduction length) of each output, from float64
    intermediates (the accumulation floor of flashsloth_kernels.testing): the largest mean
    absolute term of a sum, with the errors its factors carry in."""
    q, k, v, g = (t.detach().double() for t in (q, k, v, grad))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    Lq, Lk, Dk, Dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    out, lse = query_patch_attention_reference(q, k, v, mask, scale)
    finite = torch.isfinite(lse)
    p = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * scale - torch.where(finite, lse, 0)[..., None])
    if mask is not None:
        p = p.masked_fill(~mask[:, None, None, :], 0)
    p = p * finite[..., None]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], 0)
    # p = exp(s - lse): an absolute error of s - lse (~ eps * (|s| + |lse| + the score's terms
    # q_d k_d scale), plus a few ulp of the kernel's exp) is a relative error of p, which
    # every p-weighted term carries
    E = 4.0 + term_size(q, k, scale) + term_size(s) + term_size(lse[finite])
    pe = p * E
    # |ds| with the errors it inherits: p's (relative, E) and dp = dO . v's (absolute)
    dsa = (p * (torch.matmul(g, v.transpose(-1, -2)) - (g * out).sum(-1, keepdim=True))).abs() * E \
        + p * torch.matmul(g.abs(), v.abs().transpose(-1, -2))

    def mean_term(a, b, n):
        """max over outputs of the mean absolute term of the sum a @ b (n terms)."""
        return float((torch.matmul(a, b) / max(1, n)).max()) if a.numel() and b.numel() else 0.0

    return {
        "out": (mean_term(pe, v.abs(), Lk), Lk),
        "lse": (E, Lk * Dk),
        "dq": (scale * mean_term(dsa, k.abs(), Lk), Lk),
        "dk": (scale * mean_term(dsa.transpose(-1, -2), q.abs(), Lq), Lq),
        "dv": (mean_term(pe.transpose(-1, -2), g.abs(), Lq), Lq),
    }


def check_attention(out, grads, q, k, v, mask, grad, scale=None, lse=None):
    """A backend's out (and grads of q, k, v, and lse when given) against the float64 oracle,
    the baseline being the reference at the inputs' precision."""
    dtype = q.dtype
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    q, k, v, mask, grad = (cpu(t) for t in (q, k, v, mask, grad))
    ref_out, ref_grads, ref_lse = _oracle(q, k, v, mask, grad, scale)
    base_out, base_grads, base_lse = _oracle(q, k, v, mask, grad, scale, dtype)
    terms = attn_terms(q, k, v, mask, grad, scale)
    assert_close("out", cpu(out), ref_out, base_out, dtype, magnitude=terms["out"][0], n=terms["out"][1])
    if lse is not None:
        lse = cpu(lse)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # lse stays fp32
        assert_close("lse", lse[fin], ref_lse[fin], base_lse[fin], lse_dtype, magnitude=terms["lse"][0],
                     n=terms["lse"][1])
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert_close(name, cpu(g), r, b, dtype, magnitude=terms[name][0], n=terms[name][1])


def check_against_reference(backend, device, case, dtype):
    B, H, Lq, Lk, (Dk, Dv), mask_mode = case
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dk, Dv, dtype, device, mask_mode)
    grad = torch.randn(B, H, Lq, Dv, dtype=dtype, device=device)
    out, grads = _run(backend, q, k, v, mask, grad)
    assert out.dtype == dtype and out.shape == (B, H, Lq, Dv)
    for name, g, t in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert g.dtype == t.dtype and g.shape == t.shape, name
    check_attention(out, grads, q, k, v, mask, grad)
    if mask is not None:
        # all-masked rows: exactly zero output and dq; masked keys: exactly zero dk, dv
        if B > 1:
            assert not out[1].any() and not grads[0][1].any()
        masked = ~mask[:, None, :, None]
        assert not grads[1].masked_select(masked).any()
        assert not grads[2].masked_select(masked).any()


# Every value of each axis of the grid: Lq {1, 9, 17}, Lk {1, 50, 729, 3645},
# (Dk, Dv) {(18, 36), (18, 18), (64, 64), (7, 13)}, H {1, 4, 32}, masks with all-masked rows.
LQS, LKS, DIMS, HS = (1, 9, 17), (1, 50, 729, 3645), ((18, 36), (18, 18), (64, 64), (7, 13)), (1, 4, 32)
FULL = [(2, H, Lq, Lk, d, m) for Lq, Lk, d, H, m in itertools.product(LQS, LKS, DIMS, HS, MASK_MODES)]
# H = 32 multiplies the float64 oracle's cost by 8: those run with --runslow (SAMPLE has some)
FULL_PARAMS = [pytest.param(c, id=case_id(c), marks=[pytest.mark.slow] if c[1] == 32 else [])
               for c in FULL]

# A representative sample for the expensive backends (Triton's interpreter): every value of
# every axis at least once, the EmbQ shapes, a key split (H = 1 with many keys), odd dims.
SAMPLE = [
    (2, 4, 9, 50, (18, 36), "mask"),
    (2, 4, 9, 50, (18, 18), "none"),
    (3, 1, 1, 1, (18, 36), "none"),
    (3, 4, 17, 1, (7, 13), "mask"),
    (2, 1, 17, 50, (64, 64), "mask"),
    (1, 4, 1, 729, (7, 13), "none"),
    (2, 32, 9, 729, (18, 36), "mask"),
    (1, 1, 9, 3645, (18, 36), "mask"),
    (2, 4, 17, 729, (64, 64), "none"),
    (2, 32, 1, 3645, (18, 18), "none"),
]
# what the Triton interpreter runs in a few seconds each
INTERP_SAMPLE = [c for c in SAMPLE + [(3, 4, 17, 1, (7, 13), "none")] if c[0] * c[1] * c[3] <= 3000]


def _skip_interp(backend, device, case):
    if backend == "triton" and device == "cpu" and case not in INTERP_SAMPLE:
        pytest.skip("too large for Triton's interpreter; covered on GPU")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("case", SAMPLE, ids=case_id)
def test_backend_matches_reference_fp32(backend, device, case):
    _skip_interp(backend, device, case)
    check_against_reference(backend, device, case, torch.float32)


@pytest.mark.parametrize("case", FULL_PARAMS)
def test_cpu_full_grid_fp32(case):
    """The issue's whole grid on the C++ backend."""
    check_against_reference("cpu", "cpu", case, torch.float32)


LOW_PRECISION = [
    (2, 4, 9, 50, (18, 36), "mask"),
    (2, 32, 9, 729, (18, 36), "mask"),
    (3, 4, 17, 1, (7, 13), "none"),
    (1, 1, 9, 3645, (64, 64), "mask"),
]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_PRECISION, ids=case_id)
def test_backend_matches_reference_low_precision(backend, device, dtype, case):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 wrongly; bf16 is tested on GPU")
    _skip_interp(backend, device, case)
    check_against_reference(backend, device, case, dtype)


@pytest.mark.parametrize("case", [(2, 4, 9, 50, (18, 36), "mask"), (1, 1, 17, 729, (7, 13), "mask")],
                         ids=case_id)
def test_cpu_float64(case):
    check_against_reference("cpu", "cpu", case, torch.float64)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_gradcheck_float64(backend, mask_mode):
    q, k, v, mask = make_inputs(3, 2, 3, 5, 4, 3, torch.float64, mask_mode=mask_mode)
    args = [t.requires_grad_() for t in (q, k, v)]
    fn = lambda q, k, v: query_patch_attention(q, k, v, mask, 0.7, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64_key_split(backend):
    """One head with many keys: the cpu backend splits the keys and merges (forward) / sums dq
    shares (backward); a whole split range masked leaves that split empty."""
    q, k, v, _ = make_inputs(1, 1, 2, 1100, 3, 2, torch.float64)
    mask = torch.rand(1, 1100) > 0.5
    mask[:, 300:900] = False
    args = [t.requires_grad_() for t in (q, k, v)]
    fn = lambda q, k, v: query_patch_attention(q, k, v, mask, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, fast_mode=True)


def test_reference_equals_per_head_loop():
    """The reference (and its closed-form backward) against the textbook formula per head."""
    B, H, Lq, Lk, Dk, Dv = 3, 2, 5, 7, 4, 6
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dk, Dv, torch.float64, mask_mode="mask")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = 0.6
    out, lse = query_patch_attention_reference(q, k, v, mask, scale)
    loop = torch.zeros(B, H, Lq, Dv, dtype=torch.float64)
    loop_lse = torch.full((B, H, Lq), math.inf, dtype=torch.float64)
    for b in range(B):
        keep = mask[b].nonzero().flatten()
        if keep.numel() == 0:
            continue
        for h in range(H):
            logits = scale * q[b, h] @ k[b, h, keep].t()
            loop[b, h] = torch.softmax(logits, -1) @ v[b, h, keep]
            loop_lse[b, h] = torch.logsumexp(logits, -1)
    g = torch.randn_like(out)
    terms = attn_terms(q, k, v, mask, g, scale)
    # both float64: the bound is the floor (the loop is its own baseline)
    assert_close("out", out, loop, loop, torch.float64, magnitude=terms["out"][0], n=terms["out"][1])
    assert torch.equal(torch.isinf(lse), torch.isinf(loop_lse))
    fin = torch.isfinite(loop_lse)
    assert_close("lse", lse[fin], loop_lse[fin], loop_lse[fin], torch.float64,
                 magnitude=terms["lse"][0], n=terms["lse"][1])
    auto = torch.autograd.grad(loop, (q, k, v), g)
    closed = attn_reference_bwd(g, q.detach(), k.detach(), v.detach(), mask, scale, out.detach(),
                                lse.detach())
    for name, a, c in zip(("dq", "dk", "dv"), auto, closed):
        assert_close(name, c, a, a, torch.float64, magnitude=terms[name][0], n=terms[name][1])


@pytest.mark.parametrize("backend,device", backend_devices())
def test_lse_and_all_masked_rows(backend, device):
    """The op's second output: lse = logsumexp of the attended logits, +inf on all-masked rows
    (where out is exactly 0); extreme logits stay finite."""
    q, k, v, mask = make_inputs(2, 2, 3, 20, 18, 36, device=device, mask_mode="mask")
    q = q * 30.0  # logits of several hundred: the softmax must subtract its max
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ATTN(q, k, v, mask, 0.5, backend)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 3)
    assert torch.isfinite(out).all()
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all() and not out[1].any()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    check_attention(out, grads, q, k, v, mask, g, 0.5, lse=lse)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_non_contiguous_inputs(backend, device):
    """Head-split views as EmbQ makes them ((B, L, H, D) transposed) give the same result."""
    B, H, Lq, Lk, Dk, Dv = 2, 4, 9, 30, 18, 36
    q = torch.randn(B, Lq, H, Dk, device=device).transpose(1, 2)
    k = torch.randn(B, Lk, H, Dk, device=device).transpose(1, 2)
    v = torch.randn(B, Lk, H * Dv + 5, device=device)[..., :H * Dv].reshape(B, Lk, H, Dv).transpose(1, 2)
    mask = (torch.rand(B, 2 * Lk, device=device) > 0.3)[:, ::2]
    assert not any(t.is_contiguous() for t in (q, k, v, mask))
    out = query_patch_attention(q, k, v, mask, backend=backend)
    base = query_patch_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(),
                                 backend=backend)
    torch.testing.assert_close(out, base)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_batch_returns_empty_and_zero_grads(backend):
    q, k, v, _ = make_inputs(0, 4, 9, 50, 18, 36)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.ones(0, 50, dtype=torch.bool)
    out = query_patch_attention(q, k, v, mask, backend=backend)
    assert out.shape == (0, 4, 9, 36)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_keys_gives_zero_output(backend):
    q, k, v, _ = make_inputs(2, 3, 4, 0, 5, 6)
    out = query_patch_attention(q.requires_grad_(), k, v, backend=backend)
    assert out.shape == (2, 3, 4, 6) and not out.any()
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert not dq.any()


def test_cpu_is_deterministic_and_thread_count_independent():
    """Same bits run to run and with 1 or several threads (the key split depends on the
    shape only; which thread runs a unit, parallel_units' dynamic choice, never matters),
    forward and backward, including a key split and query superblocks with a split."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            for shape in ((2, 32, 9, 729, 18, 36), (1, 1, 9, 3645, 18, 36),
                          (1, 3, 17, 600, 18, 36)):
                torch.manual_seed(3)
                q, k, v, mask = make_inputs(*shape, mask_mode="mask")
                g = torch.randn(*shape[:3], shape[5])
                out, grads = _run("cpu", q, k, v, mask, g)
                results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    half = len(results) // 3
    for other in (results[half:2 * half], results[2 * half:]):
        for a, b in zip(results[:half], other):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_opcheck():
    for backend in ("reference", "cpu"):
        for mask_mode in MASK_MODES:
            q, k, v, mask = make_inputs(2, 3, 4, 11, 5, 7, mask_mode=mask_mode)
            args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, 0.4, backend)
            torch.library.opcheck(ATTN.default, args)
            out, lse = ATTN(*args)
            g = torch.randn_like(out)
            torch.library.opcheck(ATTN_BWD.default,
                                  (g, q.detach(), k.detach(), v.detach(), mask, 0.4, out.detach(),
                                   lse, backend))


@pytest.mark.triton
def test_opcheck_triton():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, mask = make_inputs(2, 2, 3, 9, 5, 7, device=device, mask_mode="mask")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, 0.4, "triton")
    torch.library.opcheck(ATTN.default, args)


class _HeadAttention(torch.nn.Module):
    """A projection, then the op: what a model calling it under torch.compile looks like."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, kv, mask):
        B, Lq, D = x.shape
        q = self.proj(x).view(B, Lq, self.heads, -1).transpose(1, 2)
        k = kv.view(B, kv.shape[1], self.heads, -1).transpose(1, 2)
        return query_patch_attention(q, k, k, mask).transpose(1, 2).reshape(B, Lq, D)


@pytest.mark.parametrize("compile_backend", [
    "aot_eager",
    # Inductor also checks the real outputs' strides against the fake kernel's; it compiles
    # for tens of seconds, and its FX graph cache keys do not see a changed fake kernel.
    pytest.param("inductor", marks=pytest.mark.slow),
])
def test_torch_compile_fullgraph(compile_backend):
    if compile_backend == "inductor":
        torch._dynamo.reset()
    model = _HeadAttention(24, 4)
    x = torch.randn(2, 9, 24, requires_grad=True)
    kv = torch.randn(2, 31, 24, requires_grad=True)
    mask = make_mask(2, 31)
    eager = model(x, kv, mask)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    with torch._inductor.config.patch(force_disable_caches=True):
        out = compiled(x, kv, mask)
    torch.testing.assert_close(out, eager)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, kv), g), torch.autograd.grad(eager, (x, kv), g)):
        torch.testing.assert_close(a, b)


def test_flop_counter_counts_forward_and_backward():
    B, H, Lq, Lk, Dk, Dv = 2, 32, 9, 729, 18, 36
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dk, Dv, mask_mode="mask")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with FlopCounterMode(display=False) as counter:
        out = query_patch_attention(q, k, v, mask)
    assert counter.get_total_flops() == 2 * B * H * Lq * Lk * (Dk + Dv)
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    counts = counter.get_flop_counts()["Global"]
    # recomputed q k^T, p^T dO, dO v^T, ds k, ds^T q
    assert counts[ATTN_BWD] == 2 * B * H * Lq * Lk * (3 * Dk + 2 * Dv)
    assert counter.get_total_flops() == counts[ATTN_BWD]


def test_inference_calls_match_the_op_and_stay_observable():
    """Calls needing no autograd skip the registered op's dispatch; the result is the op's, and
    under a dispatch mode (FlopCounterMode) the op runs and is counted."""
    q, k, v, mask = make_inputs(2, 4, 9, 50, 18, 36, mask_mode="mask")
    with torch.no_grad():
        direct = query_patch_attention(q, k, v, mask)
        with FlopCounterMode(display=False) as counter:
            observed = query_patch_attention(q, k, v, mask)
    assert counter.get_total_flops() == 2 * 2 * 4 * 9 * 50 * (18 + 36)
    assert torch.equal(direct, observed)
    assert torch.equal(direct, ATTN(q, k, v, mask, 18 ** -0.5, "cpu")[0])
    assert torch.equal(direct, query_patch_attention(q, k, v.requires_grad_(), mask))


def test_auto_prefers_cpu_backend_on_cpu():
    why = attn_op.dispatcher.reasons("cpu", torch.device("cpu"), torch.float32)
    if why:
        pytest.fail("the C++ extension is not built: " + "; ".join(why))
    assert attn_op.dispatcher.select("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert attn_op.dispatcher.select("auto", torch.device("cpu"), torch.float64) == "cpu"


def test_backend_env_var_and_explicit_backend_errors(monkeypatch):
    q, k, v, _ = make_inputs(1, 2, 3, 4, 5, 6)
    monkeypatch.setenv("FLASHSLOTH_BACKEND", "reference")
    assert attn_op.dispatcher.select(None, q.device, q.dtype) == "reference"
    monkeypatch.setenv("FLASHSLOTH_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FLASHSLOTH_BACKEND"):
        query_patch_attention(q, k, v)
    monkeypatch.delenv("FLASHSLOTH_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="float64"):
        query_patch_attention(q.double(), k.double(), v.double(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="Triton needs CUDA tensors"):
        query_patch_attention(q, k, v, backend="triton")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        query_patch_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        query_patch_attention(q, k, v, backend="gpu")


# (B, H, Lq, Lk, Dk, Dv) = (2, 3, 4, 5, 6, 7); each entry changes one argument.
BAD_INPUTS = {
    "q-not-tensor": (lambda q, k, v, m: dict(q=q.tolist()), TypeError, "q: expected a torch.Tensor"),
    "q-rank": (lambda q, k, v, m: dict(q=q[0]), ValueError, "q: expected a 4-D tensor"),
    "k-rank": (lambda q, k, v, m: dict(k=k[0]), ValueError, "k: expected a 4-D tensor"),
    "v-rank": (lambda q, k, v, m: dict(v=v[..., 0]), ValueError, "v: expected a 4-D tensor"),
    "q-int-dtype": (lambda q, k, v, m: dict(q=q.long()), TypeError, "q: expected a floating-point"),
    "k-dtype": (lambda q, k, v, m: dict(k=k.double()), TypeError, "k: expected dtype torch.float32"),
    "v-dtype": (lambda q, k, v, m: dict(v=v.half()), TypeError, "v: expected dtype torch.float32"),
    "k-device": (lambda q, k, v, m: dict(k=k.to("meta")), ValueError, "k: expected a tensor on q's device"),
    "B-mismatch": (lambda q, k, v, m: dict(k=k[:1]), ValueError, r"k: expected shape \(2, 3, \*, 6\)"),
    "H-mismatch": (lambda q, k, v, m: dict(k=k[:, :2], v=v[:, :2]), ValueError, r"k: expected shape \(2, 3, \*, 6\)"),
    "Dk-mismatch": (lambda q, k, v, m: dict(k=k[..., :5]), ValueError, r"k: expected shape \(2, 3, \*, 6\)"),
    "Lk-mismatch": (lambda q, k, v, m: dict(v=v[:, :, :4]), ValueError, r"v: expected shape \(2, 3, 5, \*\)"),
    "v-batch": (lambda q, k, v, m: dict(v=v[:1]), ValueError, r"v: expected shape \(2, 3, 5, \*\)"),
    "Dk-zero": (lambda q, k, v, m: dict(q=q[..., :0], k=k[..., :0]), ValueError, r"q: expected a head size Dk in 1\.\.256, got 0"),
    "Dk-too-big": (lambda q, k, v, m: dict(q=torch.randn(2, 3, 4, 257), k=torch.randn(2, 3, 5, 257)), ValueError, "Dk in 1..256, got 257"),
    "Dv-too-big": (lambda q, k, v, m: dict(v=torch.randn(2, 3, 5, 300)), ValueError, r"v: expected a head size Dv in 1\.\.256, got 300"),
    "mask-shape": (lambda q, k, v, m: dict(key_padding_mask=m[:, :4]), ValueError, r"key_padding_mask: expected shape \(2, 5\)"),
    "mask-rank": (lambda q, k, v, m: dict(key_padding_mask=m[:, None]), ValueError, r"key_padding_mask: expected shape \(2, 5\)"),
    "mask-dtype": (lambda q, k, v, m: dict(key_padding_mask=m.float()), TypeError, "key_padding_mask: expected dtype torch.bool"),
    "mask-not-tensor": (lambda q, k, v, m: dict(key_padding_mask=m.tolist()), TypeError, "key_padding_mask: expected a torch.Tensor"),
    "mask-device": (lambda q, k, v, m: dict(key_padding_mask=m.to("meta")), ValueError, "key_padding_mask: expected a tensor on q's device"),
    "scale-zero": (lambda q, k, v, m: dict(scale=0.0), ValueError, r"scale: expected a finite float in \(0, 10000\], got 0.0"),
    "scale-negative": (lambda q, k, v, m: dict(scale=-0.5), ValueError, r"scale: expected a finite float in \(0, 10000\], got -0.5"),
    "scale-nan": (lambda q, k, v, m: dict(scale=math.nan), ValueError, "scale: expected a finite float in .*, got nan"),
    "scale-huge": (lambda q, k, v, m: dict(scale=1e300), ValueError, r"scale: expected a finite float in \(0, 10000\], got 1e\+300"),
    "scale-inf": (lambda q, k, v, m: dict(scale=math.inf), ValueError, "scale: expected a finite float in .*, got inf"),
    "scale-type": (lambda q, k, v, m: dict(scale="0.5"), TypeError, "scale: expected a float > 0 or None, got str"),
    "scale-bool": (lambda q, k, v, m: dict(scale=True), TypeError, "scale: expected a float > 0 or None, got bool"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name):
    make_kwargs, exc, pattern = BAD_INPUTS[name]
    q, k, v, mask = make_inputs(2, 3, 4, 5, 6, 7, mask_mode="mask")
    kwargs = dict(q=q, k=k, v=v, key_padding_mask=mask)
    kwargs.update(make_kwargs(q, k, v, mask))
    with pytest.raises(exc, match=pattern):
        query_patch_attention(**kwargs)


def test_package_exports():
    assert fk.query_patch_attention is query_patch_attention
    assert "query_patch_attention" in fk.available_backends()


def test_cpu_isa_env_var_forces_each_variant(monkeypatch):
    """FLASHSLOTH_CPU_ISA picks each variant this CPU supports (all of them then meet the
    criterion); an unknown name or a variant the CPU lacks is a clear ValueError."""
    from flashsloth_kernels.attention import fused_cpu

    supported = fused_cpu.supported_isas()
    assert supported and supported[-1] == "baseline"
    try:
        for isa in supported:
            monkeypatch.setenv("FLASHSLOTH_CPU_ISA", isa)
            assert fused_cpu.isa() == isa
            check_against_reference("cpu", "cpu", (2, 4, 9, 50, (18, 36), "mask"), torch.float32)
        monkeypatch.setenv("FLASHSLOTH_CPU_ISA", "auto")
        assert fused_cpu.isa() == supported[0]
        monkeypatch.setenv("FLASHSLOTH_CPU_ISA", "sse9")
        with pytest.raises(ValueError, match="FLASHSLOTH_CPU_ISA='sse9' is not an instruction-set variant"):
            query_patch_attention(*make_inputs(1, 1, 2, 3, 4, 4)[:3], backend="cpu")
        missing = [i for i in ("avx512bf16", "avx512", "avx2") if i not in supported]
        if missing:
            monkeypatch.setenv("FLASHSLOTH_CPU_ISA", missing[0])
            with pytest.raises(ValueError, match="cannot run that variant"):
                query_patch_attention(*make_inputs(1, 1, 2, 3, 4, 4)[:3], backend="cpu")
    finally:
        monkeypatch.delenv("FLASHSLOTH_CPU_ISA", raising=False)
        fused_cpu.isa()  # back to auto
