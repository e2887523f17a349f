"""The C++ CPU attention kernels (csrc/attention) against the float64 reference: the issue's
whole grid on the host functions directly (forward and the three gradients, fp32 / bf16 /
fp16, masks with all-masked rows, key splits), the numeric contract (masked rows never read,
non-finite scores, all-masked rows) and gradcheck in float64.

The kernels run with the widest instruction set of this CPU (``fused_cpu.isa()``); CI repeats
the suite with each narrower variant forced.
"""

import itertools

import pytest
import torch

from flashsloth_kernels import query_patch_attention
from flashsloth_kernels.attention import fused_cpu
from flashsloth_kernels.attention.reference import query_patch_attention_reference
from flashsloth_kernels.testing import assert_close
from test_attention import attn_terms, check_attention

LQS = (1, 9, 17)
LKS = (1, 50, 729, 3645)
# every head dim of the issue (7, 13, 18, 36, 64, 256) as Dk and as Dv, Dk != Dv included
DIMS = ((7, 13), (13, 7), (18, 36), (36, 18), (64, 256), (256, 64))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(B, H, Lq, Lk, Dk, Dv, dtype, masked):
    q = torch.randn(B, H, Lq, Dk).to(dtype)
    k = torch.randn(B, H, Lk, Dk).to(dtype)
    v = torch.randn(B, H, Lk, Dv).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(B, Lk) > 0.3
        mask[0, 0] = True
        mask[-1] = False  # the last sample: every key masked
    return q, k, v, mask


def _poison(k, v, mask):
    """NaN and inf in every masked key / value row: the kernels must never read them."""
    if mask is None:
        return k, v
    k, v = k.clone(), v.clone()
    rows = ~mask[:, None, :, None]
    k = k.masked_fill(rows, float("nan"))
    v = v.masked_fill(rows, float("inf"))
    return k, v


def _forward_close(out, lse, q, k, v, mask, scale, magnitudes=True):
    """A forward's out and lse against the float64 reference, the baseline being the reference
    at the inputs' precision; ``magnitudes=False`` drops the accumulation floor's term sizes
    (an exactness check for well-separated scores)."""
    ref_out, ref_lse = query_patch_attention_reference(q.double(), k.double(), v.double(), mask,
                                                       scale)
    base_out, base_lse = query_patch_attention_reference(q, k, v, mask, scale)
    terms = attn_terms(q, k, v, mask, torch.zeros_like(out), scale) if magnitudes else {}
    for name, a, r, b in (("out", out, ref_out, base_out), ("lse", lse, ref_lse, base_lse)):
        m, n = terms.get(name, (0.0, 1))
        assert_close(name, a, r, b, q.dtype if name == "out" else torch.float32, magnitude=m, n=n)


def _cases():
    for Lq, Lk, dims, dtype in itertools.product(LQS, LKS, DIMS, DTYPES):
        # the wide heads with many keys cost the float64 oracle most: one dtype there
        if dims[0] * dims[1] >= 64 * 256 and Lk == 3645 and dtype != torch.float32:
            continue
        yield pytest.param(Lq, Lk, dims, dtype,
                           id=f"Lq{Lq}-Lk{Lk}-d{dims[0]}x{dims[1]}-{str(dtype)[6:]}")


@pytest.mark.parametrize("Lq,Lk,dims,dtype", list(_cases()))
def test_grid_against_float64_reference(Lq, Lk, dims, dtype):
    Dk, Dv = dims
    # H = 1 with many keys: the key split + merge path; H = 2: one unit per (b, h)
    B, H = 2, (1 if Lk >= 729 else 2)
    masked = Lk > 1
    q, k, v, mask = _inputs(B, H, Lq, Lk, Dk, Dv, dtype, masked)
    scale = Dk ** -0.5
    grad = torch.randn(B, H, Lq, Dv).to(dtype)
    kp, vp = _poison(k, v, mask)
    out, lse = fused_cpu.attn_fwd(q, kp, vp, mask, scale)
    dq, dk, dv = fused_cpu.attn_bwd(grad, q, kp, vp, mask, scale, out, lse)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert all(g.dtype == dtype for g in (dq, dk, dv))
    # against the float64 oracle on the clean rows, the baseline being the reference at the
    # inputs' precision (flashsloth_kernels.testing's criterion)
    check_attention(out, (dq, dk, dv), q, k, v, mask, grad, scale, lse=lse)
    if mask is not None:
        rows = ~mask[:, None, :, None]
        assert not dk.masked_select(rows).any() and not dv.masked_select(rows).any()
        # the all-masked sample: out 0, lse +inf, every gradient 0
        assert not out[-1].any() and torch.isinf(lse[-1]).all() and (lse[-1] > 0).all()
        assert not dq[-1].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("Lq", [1, 9], ids=["key-lanes", "query-lanes"])
@pytest.mark.parametrize("Dv", [15, 16, 17, 19, 20, 21, 24, 33, 48, 52])
def test_value_widths_around_the_tail(Dv, Lq, dtype):
    """P x V's last value vector on every side of its boundaries: Dv % 16 of 1 to 4 takes the
    4-lane tail on AVX-512 (read at Dv - 4, overlapping the full vector before it by 3 to 0
    dims), 5 and more a full vector ending at Dv, 0 none; Dv < 16 the zero-padded buffer. Both
    forward layouts, with masked (poisoned) keys, against the float64 reference."""
    q, k, v, mask = _inputs(2, 2, Lq, 70, 18, Dv, dtype, True)
    kp, vp = _poison(k, v, mask)
    grad = torch.randn(2, 2, Lq, Dv).to(dtype)
    out, lse = fused_cpu.attn_fwd(q, kp, vp, mask, 0.3)
    dq, dk, dv = fused_cpu.attn_bwd(grad, q, kp, vp, mask, 0.3, out, lse)
    check_attention(out, (dq, dk, dv), q, k, v, mask, grad, 0.3, lse=lse)


@pytest.mark.parametrize("Lk", [150, 300])
@pytest.mark.parametrize("Dk", [7, 13, 18])
@pytest.mark.parametrize("Lq", list(range(1, 17)))
def test_every_layout_choice(Lq, Dk, Lk):
    """Every query count up to 16: which of them run in key lanes and which in query lanes
    depends on the ISA (on AVX2 key lanes unless the query blocks are 7/8 full; on AVX-512
    Lq = 9 in 8 + 1 lanes), and the key lanes' score tiles on the query count (1 x 8, 2 x 4,
    3 x 3, 4 x 2 key vectors on AVX2); Dk = 7, 13, 18 end the in-register K transposition with
    a 3-, 1- and 2-dim block. Lk = 150 and 300 with a mask: full and partial key chunks (64
    keys on AVX2, 256 on AVX-512), masked rows poisoned."""
    q, k, v, mask = _inputs(2, 2, Lq, Lk, Dk, 36, torch.float32, True)
    kp, vp = _poison(k, v, mask)
    grad = torch.randn(2, 2, Lq, 36)
    out, lse = fused_cpu.attn_fwd(q, kp, vp, mask, 0.3)
    dq, dk, dv = fused_cpu.attn_bwd(grad, q, kp, vp, mask, 0.3, out, lse)
    check_attention(out, (dq, dk, dv), q, k, v, mask, grad, 0.3, lse=lse)


@pytest.mark.parametrize("Lk", [255, 256, 257, 513, 767])
@pytest.mark.parametrize("Lq", [1, 2, 9, 25])
def test_key_chunk_boundaries(Lq, Lk):
    """Key counts at the AVX-512 forward's 256-key chunk edges (and 64-key ones elsewhere),
    every key of a chunk masked in one batch row (a chunk with nothing attended is skipped),
    against the float64 reference."""
    q, k, v, mask = _inputs(2, 2, Lq, Lk, 18, 36, torch.float32, True)
    mask[0, 256:512] = False
    mask[0, 0] = True  # the row keeps an attended key
    kp, vp = _poison(k, v, mask)
    grad = torch.randn(2, 2, Lq, 36)
    out, lse = fused_cpu.attn_fwd(q, kp, vp, mask, 0.3)
    dq, dk, dv = fused_cpu.attn_bwd(grad, q, kp, vp, mask, 0.3, out, lse)
    check_attention(out, (dq, dk, dv), q, k, v, mask, grad, 0.3, lse=lse)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("Lk", [50, 3645])
@pytest.mark.parametrize("Lq", [17, 20, 21, 24, 25, 33, 41, 50, 57, 64, 65, 70])
def test_query_superblocks(Lq, Lk, dtype):
    """Query counts whose forward splits into superblocks of different layouts (Lq = 17:
    16 queries in query lanes and 1 in key lanes, except on AVX2, which runs all 17 in key
    lanes; above 64: superblocks of 64 and a tail),
    with a key split (Lk = 3645, H = 1), against the float64 reference."""
    H = 1 if Lk > 729 else 2
    q, k, v, mask = _inputs(2, H, Lq, Lk, 18, 36, dtype, True)
    kp, vp = _poison(k, v, mask)
    grad = torch.randn(2, H, Lq, 36).to(dtype)
    out, lse = fused_cpu.attn_fwd(q, kp, vp, mask, 0.3)
    dq, dk, dv = fused_cpu.attn_bwd(grad, q, kp, vp, mask, 0.3, out, lse)
    check_attention(out, (dq, dk, dv), q, k, v, mask, grad, 0.3, lse=lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("H,Lk", [(2, 50), (1, 3645)], ids=["one-unit", "key-split"])
def test_masked_rows_change_nothing(dtype, H, Lk):
    """Garbage (NaN, inf, huge) in masked rows gives bit-identical out, lse and dq."""
    q, k, v, mask = _inputs(2, H, 9, Lk, 18, 36, dtype, True)
    mask[-1, :3] = True  # no all-masked sample here
    grad = torch.randn(2, H, 9, 36).to(dtype)
    clean = fused_cpu.attn_fwd(q, k, v, mask, 0.3)
    for fill in (float("nan"), float("inf"), -3e38 if dtype != torch.float16 else -6e4):
        rows = ~mask[:, None, :, None]
        kg, vg = k.masked_fill(rows, fill), v.masked_fill(rows, fill)
        out, lse = fused_cpu.attn_fwd(q, kg, vg, mask, 0.3)
        assert torch.equal(out, clean[0]) and torch.equal(lse, clean[1])
        dq, dk, dv = fused_cpu.attn_bwd(grad, q, kg, vg, mask, 0.3, out, lse)
        dq0, dk0, dv0 = fused_cpu.attn_bwd(grad, q, k, v, mask, 0.3, *clean)
        assert torch.equal(dq, dq0)
        assert torch.equal(dk.masked_fill(rows, 0), dk0.masked_fill(rows, 0))
        assert not dk.masked_select(rows).any() and not dv.masked_select(rows).any()
        assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")],
                         ids=["pinf", "ninf", "nan"])
@pytest.mark.parametrize("H,Lk", [(2, 50), (1, 3645)], ids=["one-unit", "key-split"])
def test_non_finite_score_makes_the_row_nan(bad, H, Lk):
    """A +-inf or NaN score at an attended key: that row's out and lse are NaN, the others
    (other heads, other samples) untouched."""
    q, k, v, _ = _inputs(2, H, 9, Lk, 18, 36, torch.float32, False)
    q = q.abs()
    k = k.clone()
    k[0, 0, Lk - 1, :] = bad  # q > 0: every score of head (0, 0) at that key is `bad`
    out, lse = fused_cpu.attn_fwd(q, k, v, None, 0.25)
    assert torch.isnan(lse[0, 0]).all() and torch.isnan(out[0, 0]).all()
    _forward_close(out[1:], lse[1:], q[1:], k[1:], v[1:], None, 0.25)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("Lk", [1, 5, 50])
@pytest.mark.parametrize("Lq", [1, 2, 9])
def test_every_score_non_finite_is_nan_not_empty(Lq, Lk, bad):
    """Every attended key of a head gives a NaN score (both forward layouts, chunks with padded
    lanes): the row is NaN, never taken for an all-masked one (out 0, lse +inf), even where the
    chunk's plain max drops the NaN scores."""
    q, k, v, _ = _inputs(2, 2, Lq, Lk, 18, 36, torch.float32, False)
    q, k = q.abs(), k.clone()
    k[0, 0] = bad
    out, lse = fused_cpu.attn_fwd(q, k, v, None, 0.25)
    assert torch.isnan(lse[0, 0]).all() and torch.isnan(out[0, 0]).all()
    _forward_close(out[1:], lse[1:], q[1:], k[1:], v[1:], None, 0.25)
    assert torch.isfinite(out[0, 1]).all() and torch.isfinite(lse[0, 1]).all()


@pytest.mark.parametrize("Lq", [1, 9], ids=["key-lanes", "query-lanes"])
def test_huge_finite_scores_stay_accurate(Lq):
    """|s| near fp32's top (documented range) is still exact: no pre-scaled q, no overflow
    (Lq = 1: the AVX-512 forward's dot products over head dims, K rows read in place)."""
    q = torch.randn(1, 2, Lq, 18)
    k = torch.randn(1, 2, 300, 18) * 1e17
    v = torch.randn(1, 2, 300, 36)
    out, lse = fused_cpu.attn_fwd(q, k, v, None, 1e-3)
    _forward_close(out, lse, q, k, v, None, 1e-3, magnitudes=False)
    # (the gradients of a one-hot softmax are dp - delta cancellations times |k| ~ 1e17:
    # ill-conditioned in any fp32 kernel, so not compared here)


@pytest.mark.parametrize("case", ["subnormal-q", "huge-q", "subnormal-k"])
@pytest.mark.parametrize("Lq,Dk", [(9, 18), (9, 7), (17, 13)])
def test_bf16_values_near_the_limits(case, Lq, Dk):
    """bf16 subnormals and huge values in q / k. On AVX512-BF16 machines the bf16 forward's
    scores run on vdpbf16ps, which reads subnormals as 0: a unit whose q holds a subnormal or
    a value above 2^64 takes the converting path instead (a subnormal q times a huge k
    contributes O(1) to a score), and a subnormal k next to moderate q loses < 2^-62 per
    score. Every variant must match the float64 reference either way."""
    torch.manual_seed(7)
    q, k, v, _ = _inputs(2, 3, Lq, 50, Dk, 36, torch.float32, False)
    if case == "subnormal-q":  # q's first dim 2^-127 (subnormal) times k's 2^126 .. 2^127
        q[..., 0], k[..., 0] = 2.0 ** -127, 2.0 ** 126 * (1 + torch.rand(k.shape[:-1]))
    elif case == "huge-q":  # 2^70 x 2^-70 terms
        q[..., 0], k[..., 0] = 2.0 ** 70, 2.0 ** -70 * torch.randn(k.shape[:-1])
    else:
        k[..., 0] = 2.0 ** -130
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    assert (q.float() != 0).any() and torch.isfinite(q.float() * 1).all()
    # dim 0's 0.5 .. 1 per key then moves each score by 2 .. 4; no term-size floor in the
    # tolerance (k's 2^126 would make it useless): a path that read the subnormal q as 0 is off
    # by ~1.1 in out here (measured by switching the gate off), the others by ~0.008
    scale = 4.0
    out, lse = fused_cpu.attn_fwd(q, k, v, None, scale)
    _forward_close(out, lse, q, k, v, None, scale, magnitudes=False)


def test_gradcheck_float64():
    q = torch.randn(2, 2, 3, 7, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 20, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 20, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 20) > 0.3
    mask[0, 0] = True
    mask[1] = False
    assert torch.autograd.gradcheck(
        lambda q, k, v: query_patch_attention(q, k, v, mask, 0.4, backend="cpu"), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: query_patch_attention(q, k, v, None, 0.4, backend="cpu"), (q, k, v))


@pytest.fixture
def restore_prefetch():
    yield
    fused_cpu.set_prefetch_min_bytes(None)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("Lq", [1, 2, 9, 17])
def test_prefetch_never_changes_results(Lq, dtype, restore_prefetch):
    """Forward and backward prefetch K / V rows ahead only above prefetch_min_bytes (by default
    a quarter of the last-level cache): forced on (0) and off (no call reaches the limit), every
    path (dot products, transposed keys, query lanes, query superblocks; masks, a key split)
    gives the same bits, and those are right."""
    default = fused_cpu.prefetch_min_bytes()
    assert default > 0
    previous = default
    for H, Lk in ((2, 300), (1, 3645)):
        q, k, v, mask = _inputs(2, H, Lq, Lk, 18, 36, dtype, masked=True)
        kp, vp = _poison(k, v, mask)
        grad = torch.randn(2, H, Lq, 36).to(dtype)
        runs = []
        for limit in (0, 1 << 62):
            assert fused_cpu.set_prefetch_min_bytes(limit) == previous
            previous = limit
            out, lse = fused_cpu.attn_fwd(q, kp, vp, mask, 0.3)
            runs.append((out, lse, *fused_cpu.attn_bwd(grad, q, kp, vp, mask, 0.3, out, lse)))
        for a, b in zip(*runs):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        out, lse, *grads = runs[0]
        check_attention(out, grads, q, k, v, mask, grad, 0.3, lse=lse)
    assert fused_cpu.set_prefetch_min_bytes(None) == 1 << 62
    assert fused_cpu.prefetch_min_bytes() == default


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                       ("8M", TypeError)])
def test_prefetch_threshold_rejects_bad_values(bad, error):
    with pytest.raises(error, match="n: expected an int >= 0 or None"):
        fused_cpu.set_prefetch_min_bytes(bad)


def test_isa_is_reported():
    assert fused_cpu.isa() in ("avx512bf16", "avx512", "avx2", "baseline")


def test_no_score_sized_tensor_in_memory():
    """Forward and backward stream the keys (the backward recomputes the probabilities from
    lse): no tensor of the scores' size (B, H, Lq, Lk) is ever allocated. With Lq = 64 and
    head dims of 8 the scores are 8x larger than any input or gradient, so the largest
    allocation (torch.profiler's memory events) must stay well below them."""
    from torch.profiler import ProfilerActivity, profile

    B, H, Lq, Lk, Dk, Dv = 2, 4, 64, 3645, 8, 8
    q, k, v, mask = _inputs(B, H, Lq, Lk, Dk, Dv, torch.float32, masked=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    scores_bytes = B * H * Lq * Lk * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = query_patch_attention(*leaves, mask, 0.3, backend="cpu")
        torch.autograd.grad(out, leaves, torch.randn_like(out))
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= scores_bytes // 3, (largest, scores_bytes)


def test_the_software_prefetches_are_compiled_in():
    """GCC may delete a __builtin_prefetch it finds free of side effects (prefetch_rows and
    prefetch_row keep theirs with an empty asm barrier): once that silently removed the key-lane
    forward's prefetches. Every variant's forward must hold prefetch instructions in its unit
    function (the K rows, during the scores) and in its P x V tiles (the V rows), and its
    backward in its unit function."""
    import re
    import shutil
    import subprocess

    from flashsloth_kernels.attention import _C

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _C.__file__],
                          capture_output=True, text=True, check=True).stdout
    prefetching = set()
    for block in text.split("\n\n"):  # one function each
        first, _, body = block.strip().partition("\n")
        head = re.search(r"<(?:void )?flashsloth::attention::(\w+)::(\w+)<float, float", first)
        if head and "prefetch" in body:
            prefetching.add(head.groups())
    for isa in ("avx512bf16", "avx512", "avx2", "baseline"):
        if f"flashsloth::attention::{isa}::" not in text:
            continue  # not compiled for this platform (the x86 variants)
        for fns in (("fwd_unit_t",), ("pv_tile", "pv_block"), ("bwd_unit_t",)):  # P x V:
            # its tiles, or the block they were inlined into
            assert any((isa, fn) in prefetching for fn in fns), \
                f"no prefetch instruction in {isa}::{' / '.join(fns)}<float, ...>"
