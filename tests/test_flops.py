"""The FLOP counter the benchmarks report from, checked against closed-form counts; and the
visual-token counts of every preset, read off the sequence the model builds.

Closed forms are written out here, independently of the ops' own helpers, so a wrong
registered formula fails. Most counts run on the meta device (no compute).
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import model as bench_model
from benchmarks import ops_attention, ops_sap
from benchmarks.flops import count_flops, count_flops_by_op


def _grad_all(out, inputs):
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


# ---------------------------------------------------------------- a Linear layer
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_linear_forward_and_backward(device):
    B, I, O = 7, 33, 20
    lin = torch.nn.Linear(I, O).to(device)
    x = torch.randn(B, I, device=device, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * B * I * O
    # backward: dx = dy W (2BIO) and dW = dy^T x (2BIO); bias terms are not counted
    def fwd_bwd():  # .backward(): autograd.grad trips FlopCounterMode's module hooks
        out = lin(x)
        out.backward(torch.ones_like(out))

    assert count_flops(fwd_bwd) == 3 * 2 * B * I * O


# ---------------------------------------------------------------- SAP
def sap_closed_form(B, N, C, Ch, need_x=True, need_w=True, backward=False):
    fwd = 2 * B * N * C * Ch + 2 * B * N * Ch + 2 * B * N * C
    if not backward:
        return fwd
    bwd = 2 * B * N * C * Ch + 2 * B * N * Ch + 2 * B * N * C      # recompute scores, dalpha
    if need_w:
        bwd += 2 * B * N * C * Ch + 2 * B * N * Ch                  # dW1, dw2
    if need_x:
        bwd += 2 * B * N * C * Ch + 2 * B * N * C                   # dz W1, alpha * g
    return fwd + bwd


def _sap_inputs(B, H, W, C, Ch, device, grad_x, grad_w):
    x = torch.randn(B, H * W, C, device=device, requires_grad=grad_x)
    ws = [torch.randn(Ch, C, device=device), torch.randn(Ch, device=device),
          torch.randn(1, Ch, device=device), torch.randn(1, device=device)]
    return x, [w.requires_grad_(grad_w) for w in ws]


@pytest.mark.parametrize("B,H,W,C,Ch,device", [
    (2, 27, 27, 1152, 1152, "meta"),   # FlashSloth's size
    (3, 7, 7, 24, 40, "cpu"),          # odd sizes, partial edge windows, real tensors
])
def test_sap_forward(B, H, W, C, Ch, device):
    from flashsloth_kernels import spatial_attention_pool

    x, (w1, b1, w2, b2) = _sap_inputs(B, H, W, C, Ch, device, False, False)
    n = count_flops(lambda: spatial_attention_pool(x, w1, b1, w2, b2, 3, (H, W)))
    assert n == sap_closed_form(B, H * W, C, Ch)


@pytest.mark.parametrize("grad_x,grad_w", [(True, True), (False, True), (True, False)])
def test_sap_forward_backward(grad_x, grad_w):
    from flashsloth_kernels import spatial_attention_pool

    B, H, W, C, Ch = 2, 27, 27, 1152, 1152
    x, ws = _sap_inputs(B, H, W, C, Ch, "meta", grad_x, grad_w)
    inputs = ([x] if grad_x else []) + (ws if grad_w else [])
    n = count_flops(lambda: _grad_all(spatial_attention_pool(x, *ws, 3), inputs))
    assert n == sap_closed_form(B, H * W, C, Ch, grad_x, grad_w, backward=True)


def test_sap_benchmark_work_is_the_counted_work():
    """The work the SAP benchmark divides by (GFLOP/s) is the closed form, fwd and fwd+bwd."""
    N, C = ops_sap.H * ops_sap.W, ops_sap.C
    assert ops_sap._op_flops(4, torch.float32, "fwd") == sap_closed_form(4, N, C, ops_sap.CH)
    assert ops_sap._op_flops(4, torch.float32, "fwd+bwd") == sap_closed_form(
        4, N, C, ops_sap.CH, backward=True)


# ---------------------------------------------------------------- query-patch attention
def attention_closed_form(B, H, Lq, Lk, Dk, Dv, backward=False):
    fwd = 2 * B * H * Lq * Lk * Dk + 2 * B * H * Lq * Lk * Dv        # q k^T, p v
    if not backward:
        return fwd
    # recomputed q k^T; dv = p^T dO; dp = dO v^T; dq = ds k; dk = ds^T q
    bwd = (2 * B * H * Lq * Lk * Dk + 2 * B * H * Lq * Lk * Dv + 2 * B * H * Lq * Lk * Dv
           + 2 * B * H * Lq * Lk * Dk + 2 * B * H * Lq * Lk * Dk)
    return fwd + bwd


@pytest.mark.parametrize("B,H,Lq,Lk,Dk,Dv,device", [
    (2, 32, 9, 729, 18, 36, "meta"),
    (8, 32, 9, 3645, 18, 36, "meta"),
    (2, 3, 5, 17, 8, 12, "cpu"),
])
def test_attention_forward(B, H, Lq, Lk, Dk, Dv, device):
    from flashsloth_kernels import query_patch_attention

    q = torch.randn(B, H, Lq, Dk, device=device)
    k = torch.randn(B, H, Lk, Dk, device=device)
    v = torch.randn(B, H, Lk, Dv, device=device)
    assert count_flops(lambda: query_patch_attention(q, k, v)) == attention_closed_form(
        B, H, Lq, Lk, Dk, Dv)


def test_attention_forward_backward():
    from flashsloth_kernels import query_patch_attention

    B, H, Lq, Lk, Dk, Dv = 4, 32, 9, 729, 18, 36
    q = torch.randn(B, H, Lq, Dk, device="meta", requires_grad=True)
    k = torch.randn(B, H, Lk, Dk, device="meta", requires_grad=True)
    v = torch.randn(B, H, Lk, Dv, device="meta", requires_grad=True)
    n = count_flops(lambda: _grad_all(query_patch_attention(q, k, v), [q, k, v]))
    assert n == attention_closed_form(B, H, Lq, Lk, Dk, Dv, backward=True)


def test_attention_benchmark_work_is_the_counted_work():
    a = ops_attention
    assert a._op_flops(16, 729, torch.float32, "fwd") == attention_closed_form(
        16, a.H, a.LQ, 729, a.DK, a.DV)
    assert a._op_flops(1, 3645, torch.float32, "fwd+bwd") == attention_closed_form(
        1, a.H, a.LQ, 3645, a.DK, a.DV, backward=True)


def test_counter_sees_attention_through_flop_counter_mode_directly():
    """The helper reports what FlopCounterMode itself reports, per op."""
    from flashsloth_kernels import query_patch_attention

    q = torch.randn(1, 2, 3, 4, device="meta")
    k = torch.randn(1, 2, 5, 4, device="meta")
    v = torch.randn(1, 2, 5, 6, device="meta")
    mode = FlopCounterMode(display=False)
    with mode:
        query_patch_attention(q, k, v)
    total, per_op = count_flops_by_op(lambda: query_patch_attention(q, k, v))
    assert total == mode.get_total_flops() == attention_closed_form(1, 2, 3, 5, 4, 6)
    assert sum(per_op.values()) == total


# ---------------------------------------------------------------- the model
def _model(preset, compression, device="meta"):
    from flashsloth.model import FlashSloth

    cfg, _ = bench_model.model_config(preset, compression)
    torch.manual_seed(0)
    return FlashSloth(cfg, device=device)


# (preset, compression) -> visual tokens reaching the LLM per image
EXPECTED_TOKENS = {
    ("flashsloth-3.2b", "flashsloth"): 90, ("flashsloth-3.2b", "sap"): 81,
    ("flashsloth-3.2b", "avgpool"): 81, ("flashsloth-3.2b", "none"): 729,
    ("flashsloth-hd-3.2b", "flashsloth"): 414, ("flashsloth-hd-3.2b", "sap"): 405,
    ("flashsloth-hd-3.2b", "avgpool"): 405, ("flashsloth-hd-3.2b", "none"): 5 * 729,
    ("tiny-27", "flashsloth"): 90, ("tiny-27", "sap"): 81, ("tiny-27", "avgpool"): 81,
    ("tiny-27", "none"): 729,
    # tiny: a 6 x 6 grid, 3 x 3 windows -> 4 tokens, + 9 queries
    ("tiny", "flashsloth"): 13, ("tiny", "sap"): 4, ("tiny", "avgpool"): 4, ("tiny", "none"): 36,
    # the peers' modes keep FlashSloth's per-view budget; fastv's 729 per view all enter
    ("flashsloth-3.2b", "visionzip"): 81, ("flashsloth-3.2b", "random"): 81,
    ("flashsloth-3.2b", "downsample"): 81, ("flashsloth-3.2b", "fastv"): 729,
    ("flashsloth-hd-3.2b", "visionzip"): 405, ("flashsloth-hd-3.2b", "random"): 405,
    ("flashsloth-hd-3.2b", "downsample"): 405, ("flashsloth-hd-3.2b", "fastv"): 3645,
    ("tiny", "visionzip"): 4, ("tiny", "random"): 4, ("tiny", "downsample"): 4,
    ("tiny", "fastv"): 36,
}


@pytest.mark.parametrize("preset,compression", sorted(EXPECTED_TOKENS),
                         ids=[f"{p}-{c}" for p, c in sorted(EXPECTED_TOKENS)])
def test_visual_tokens_of_every_preset(preset, compression):
    model = _model(preset, compression)
    ids = bench_model.prompt_ids(model.config)
    tokens, length = bench_model.visual_tokens_in_layout(model, ids)
    assert tokens == EXPECTED_TOKENS[(preset, compression)]
    assert tokens == model.num_visual_tokens()
    text = ids.shape[1] - 2    # the image and slot markers are replaced
    assert length == text + tokens


@pytest.mark.parametrize("compression", bench_model.COMPRESSIONS)
def test_prefill_flops_match_the_real_prefill(compression):
    """The meta-device composition the benchmark uses for the 3.2B presets counts exactly
    what FlopCounterMode counts over the model's own prefill on real tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model("tiny", compression, device="cpu").eval()
    cfg = model.config
    ids = bench_model.prompt_ids(cfg)
    px = torch.rand(bench_model.pixel_shape(cfg))
    with sdpa_kernel([SDPBackend.MATH]):
        real = count_flops(lambda: model.prefill(px, ids))
    composed = bench_model.prefill_flops(model, ids)
    assert composed["total"] == real
    on_meta = bench_model.prefill_flops(_model("tiny", compression), ids)
    assert on_meta == composed


def test_prefill_flops_shrink_with_compression():
    flops = {}
    for c in ("none", "sap"):
        model = _model("flashsloth-3.2b", c)
        flops[c] = bench_model.prefill_flops(model, bench_model.prompt_ids(model.config))
    # the LLM part scales with the sequence (729 -> 81 visual tokens); the tower does not
    assert flops["sap"]["llm"] < flops["none"]["llm"] / 4
    assert flops["sap"]["vision"] > 0.95 * flops["none"]["vision"]


# ---------------------------------------------------------------- the peers' modes, closed forms
def _vision_closed_form(cfg, views):
    """SigLIP tower (patch conv, per layer q/k/v/o + attention + MLP), no pooling counted."""
    v = cfg.vision
    N, C, F, P = v.num_patches, v.hidden_size, v.intermediate_size, v.patch_size
    conv = 2 * N * C * v.num_channels * P * P
    layer = 2 * N * (4 * C * C + 2 * C * F) + 4 * N * N * C
    return views * (conv + v.num_built_layers * layer)


def _projector(cfg, tokens):
    Cv, D = cfg.vision.hidden_size, cfg.text.hidden_size
    return 2 * tokens * (Cv * D + D * D)


def _decoder_layer(cfg, L):
    D, F = cfg.text.hidden_size, cfg.text.intermediate_size
    return 2 * L * (4 * D * D + 2 * D * F) + 4 * L * L * D


@pytest.mark.parametrize("preset", ["flashsloth-3.2b", "flashsloth-hd-3.2b", "tiny-27"])
@pytest.mark.parametrize("mode", ["visionzip", "fastv", "random", "downsample"])
def test_peer_prefill_flops_closed_forms(preset, mode):
    model = _model(preset, mode)
    cfg = model.config
    ids = bench_model.prompt_ids(cfg)
    got = bench_model.prefill_flops(model, ids)
    V, N, k = cfg.num_views, cfg.vision.num_patches, cfg.budget_per_view
    D, n = cfg.text.hidden_size, cfg.text.num_hidden_layers
    text = ids.shape[1] - 2
    vision = _vision_closed_form(cfg, V) + _projector(cfg, cfg.num_image_tokens)
    if mode == "visionzip":
        dom, ctx = cfg.visionzip_split
        rest = N - dom
        hd = cfg.vision.hidden_size // cfg.vision.num_attention_heads
        # similarities (others x targets, head-averaged keys) and the assigned sums
        vision += V * (2 * (rest - ctx) * ctx * hd + 2 * ctx * (rest - ctx)
                       * cfg.vision.hidden_size)
    head = 2 * D * cfg.text.vocab_size
    if mode == "fastv":
        K, L, Lk = cfg.fastv_layer, text + V * N, text + V * k
        # FastV's ranking: layer K's key projection, the last query's projection, its scores
        rank = 2 * L * D * D + 2 * D * D + 2 * L * D
        llm = K * _decoder_layer(cfg, L) + rank + (n - K) * _decoder_layer(cfg, Lk) + head
    else:
        llm = n * _decoder_layer(cfg, text + V * k) + head
    assert got == {"total": vision + llm, "vision": vision, "llm": llm}


@pytest.mark.parametrize("preset", ["flashsloth-3.2b", "flashsloth-hd-3.2b"])
def test_fastv_kv_cache_bytes_closed_form(preset):
    model = _model(preset, "fastv")
    cfg = model.config
    row = bench_model._counts(preset, "fastv", torch.float32)
    text = bench_model.prompt_ids(cfg).shape[1] - 2
    L, Lk = text + cfg.num_views * 729, text + cfg.num_views * 81
    K, n, D = cfg.fastv_layer, cfg.text.num_hidden_layers, cfg.text.hidden_size
    assert row["kv_cache_bytes"] == 2 * 4 * D * (K * L + (n - K) * Lk)
    assert row["visual_tokens"] == cfg.num_views * 729
    assert row["visual_tokens_kept"] == cfg.num_views * 81
