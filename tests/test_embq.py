"""EmbeddedQuery (FlashSloth's EmbQ / LQFormer): against a plain transcription of the original
formula with the same weights (forward and gradients, every backend), the original checkpoint
layout and parameter count, multi-layer chaining, masks, torch.compile and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_devices

import flashsloth_kernels as fk
from flashsloth_kernels import EmbeddedQuery
from flashsloth_kernels.testing import assert_close

# The original checkpoint's keys under model.lqformer. and their shapes at FlashSloth's size
# (llm 2560, vision 1152, down 576): every Linear has a bias.
ORIGINAL_SHAPES = {
    "down_projector_learnable_text.weight": (576, 2560),
    "down_projector_learnable_text.bias": (576,),
    "down_projector_image.weight": (576, 1152),
    "down_projector_image.bias": (576,),
    "layers.0.t2q_attn.q_proj.weight": (576, 576),
    "layers.0.t2q_attn.q_proj.bias": (576,),
    "layers.0.t2q_attn.k_proj.weight": (576, 576),
    "layers.0.t2q_attn.k_proj.bias": (576,),
    "layers.0.t2q_attn.v_proj.weight": (576, 576),
    "layers.0.t2q_attn.v_proj.bias": (576,),
    "layers.0.i2q_attn.q_proj.weight": (576, 576),
    "layers.0.i2q_attn.q_proj.bias": (576,),
    "layers.0.i2q_attn.k_proj.weight": (576, 576),
    "layers.0.i2q_attn.k_proj.bias": (576,),
    "layers.0.i2q_attn.v_proj.weight": (1152, 1152),
    "layers.0.i2q_attn.v_proj.bias": (1152,),
    "layers.0.ln_text.weight": (576,),
    "layers.0.ln_text.bias": (576,),
    "layers.0.ln_q.weight": (576,),
    "layers.0.ln_q.bias": (576,),
    "layers.0.ln_kv.weight": (576,),
    "layers.0.ln_kv.bias": (576,),
    "up_projector.weight": (2560, 1152),
    "up_projector.bias": (2560,),
}


def transcription(w, hq, ht, text_mask, feats, heads, num_layers=1):
    """EmbQ written out from the paper's description and the original code, one head at a time.

    w: state dict with the original key names. Hq <- Hq + Up(A2) per layer, with
    Q0 = LN_q(Dt Hq), T = LN_text(Dt Ht), Khat = LN_kv(Di F);
    A1 = MHA(Wq1 Q0, Wk1 T, Wv1 T) over the real text tokens; A2 = MHA(Wq2 A1, Wk2 Khat, Wv2 F).
    A sample with no real text token gets A1 = 0 (this package's choice for all-masked rows).
    """
    def linear(x, name):
        return x @ w[f"{name}.weight"].t() + w[f"{name}.bias"]

    def norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def mha(xq, xk, xv, prefix, mask):
        q, k, v = linear(xq, f"{prefix}.q_proj"), linear(xk, f"{prefix}.k_proj"), linear(xv, f"{prefix}.v_proj")
        dk, dv = q.shape[-1] // heads, v.shape[-1] // heads
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        for b in range(q.shape[0]):
            keep = torch.arange(k.shape[1]) if mask is None else mask[b].nonzero().flatten()
            if keep.numel() == 0:
                continue
            for h in range(heads):
                qh = q[b, :, h * dk:(h + 1) * dk]
                kh = k[b, keep, h * dk:(h + 1) * dk]
                vh = v[b, keep, h * dv:(h + 1) * dv]
                attn = torch.softmax(qh @ kh.t() / math.sqrt(dk), dim=-1)
                out[b, :, h * dv:(h + 1) * dv] = attn @ vh
        return out

    for i in range(num_layers):
        q0 = norm(linear(hq, "down_projector_learnable_text"), f"layers.{i}.ln_q")
        t = norm(linear(ht, "down_projector_learnable_text"), f"layers.{i}.ln_text")
        khat = norm(linear(feats, "down_projector_image"), f"layers.{i}.ln_kv")
        a1 = mha(q0, t, t, f"layers.{i}.t2q_attn", text_mask)
        a2 = mha(a1, khat, feats, f"layers.{i}.i2q_attn", None)
        hq = hq + linear(a2, "up_projector")
    return hq


SMALL = dict(llm_dim=40, vision_dim=24, down_dim=12, num_heads=4)  # heads of 3 (keys), 6 (i2q values)


def make_module(num_layers=1, dtype=torch.float64, **dims):
    dims = dims or SMALL
    torch.manual_seed(1)
    embq = EmbeddedQuery(**dims, num_layers=num_layers).to(dtype)
    with torch.no_grad():  # LayerNorms off their identity init, so the test sees them
        for name, p in embq.named_parameters():
            if name.endswith(("ln_text.weight", "ln_q.weight", "ln_kv.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif ".ln_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return embq


def make_inputs(B, Q, T, N, llm_dim, vision_dim, dtype=torch.float64, all_padded=False, **_):
    hq = torch.randn(B, Q, llm_dim, dtype=dtype)
    ht = torch.randn(B, T, llm_dim, dtype=dtype)
    feats = torch.randn(B, N, vision_dim, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, T // 2:] = False       # right-padded question
    if all_padded and B > 2:
        mask[2] = False
    return hq, ht, mask, feats


def check_module(embq, backend, B=3, Q=9, T=7, N=10, num_layers=1, all_padded=True,
                 dtype=torch.float64, grads=True):
    embq.backend = backend
    dims = dict(llm_dim=embq.llm_dim, vision_dim=embq.vision_dim)
    hq, ht, mask, feats = make_inputs(B, Q, T, N, **dims, dtype=dtype, all_padded=all_padded)
    leaves = [t.clone().requires_grad_(grads) for t in (hq, ht, feats)]
    out = embq(leaves[0], leaves[1], mask, leaves[2])
    w = {k: v.detach().double().requires_grad_(grads) for k, v in embq.state_dict().items()}
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in leaves]
    ref = transcription(w, ref_leaves[0], ref_leaves[1], mask, ref_leaves[2], embq.num_heads,
                        num_layers)
    # the baseline of the criterion: the same transcription at the input precision
    wb = {k: v.detach().requires_grad_(grads) for k, v in embq.state_dict().items()}
    base_leaves = [t.detach().clone().requires_grad_(grads) for t in leaves]
    base = transcription(wb, base_leaves[0], base_leaves[1], mask, base_leaves[2], embq.num_heads,
                         num_layers)
    assert out.shape == (B, Q, embq.llm_dim) and out.dtype == dtype
    # sums of this module reduce over at most max(llm_dim, vision_dim, N) terms of ~|result|
    n = max(embq.llm_dim, embq.vision_dim, N, T)
    assert_close("out", out, ref, base, dtype, magnitude=ref.abs().max().item(), n=n)
    if not grads:
        return
    g = torch.randn_like(ref)
    params = dict(embq.named_parameters())
    got = torch.autograd.grad(out, leaves + list(params.values()), g.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves + [w[n] for n in params], g)
    basegr = torch.autograd.grad(base, base_leaves + [wb[n] for n in params], g.to(dtype))
    # a gradient that cancels to ~0 (the key bias's: softmax is shift-invariant) is a sum of
    # terms of the size of the module's gradients
    terms = max(t.abs().max().item() for t in want if t.numel())
    for name, a, b, c in zip(["d_query_states", "d_text_states", "d_image_features"] + list(params),
                             got, want, basegr):
        assert_close(name, a, b, c, dtype, magnitude=terms, n=n * B * Q)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_matches_transcription_fp32(backend, device):
    if device != "cpu":
        pytest.skip("the transcription runs on CPU; GPU backends are covered by test_attention")
    check_module(make_module(dtype=torch.float32), backend, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_matches_transcription_float64(backend):
    check_module(make_module(), backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_multi_layer_chains_through_hq(backend):
    check_module(make_module(num_layers=2), backend, num_layers=2)


def test_flashsloth_size_matches_transcription():
    """The real sizes (2560 / 1152 / 576, 32 heads: key heads 18, value heads 36), 729 patches."""
    embq = make_module(dtype=torch.float32, llm_dim=2560, vision_dim=1152, down_dim=576, num_heads=32)
    check_module(embq, None, B=1, Q=9, T=12, N=729, dtype=torch.float32, all_padded=False,
                 grads=False)


def test_state_dict_is_the_original_layout():
    embq = EmbeddedQuery(2560, 1152)
    state = embq.state_dict()
    assert list(state) == list(ORIGINAL_SHAPES)
    assert {k: tuple(v.shape) for k, v in state.items()} == ORIGINAL_SHAPES
    assert sum(p.numel() for p in embq.parameters()) == 8_084_416
    layers3 = EmbeddedQuery(2560, 1152, num_layers=3).state_dict()
    assert {k for k in layers3 if k.startswith("layers.2.")} == {
        k.replace("layers.0.", "layers.2.") for k in ORIGINAL_SHAPES if k.startswith("layers.0.")}


def test_loads_original_checkpoint_keys():
    """A checkpoint in the original's layout (model.lqformer.*) loads with the prefix stripped
    and the module computes the transcription with those weights."""
    dims = dict(llm_dim=64, vision_dim=32, down_dim=16, num_heads=4)
    original = {f"model.lqformer.{k}": torch.randn(v.shape, dtype=torch.float64) * 0.2
                for k, v in EmbeddedQuery(**dims).state_dict().items()}
    embq = EmbeddedQuery(**dims).double()
    missing, unexpected = embq.load_state_dict(
        {k.removeprefix("model.lqformer."): v for k, v in original.items()}, strict=True)
    assert not missing and not unexpected
    hq, ht, mask, feats = make_inputs(2, 9, 5, 20, 64, 32)
    w = {k.removeprefix("model.lqformer."): v for k, v in original.items()}
    torch.testing.assert_close(embq(hq, ht, mask, feats), transcription(w, hq, ht, mask, feats, 4))


def test_text_mask_none_int_and_all_padding():
    embq = make_module()
    hq, ht, mask, feats = make_inputs(3, 2, 6, 5, SMALL["llm_dim"], SMALL["vision_dim"],
                                      all_padded=True)
    w = {k: v.detach() for k, v in embq.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(embq(hq, ht, None, feats), transcription(w, hq, ht, None, feats, 4))
        torch.testing.assert_close(embq(hq, ht, mask.long(), feats), embq(hq, ht, mask, feats))
        # an all-padding question: A1 = 0, so i2q sees only its biases as queries
        out = embq(hq, ht, mask, feats)
        torch.testing.assert_close(out, transcription(w, hq, ht, mask, feats, 4))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend,device", backend_devices())
def test_empty_question_text_contributes_zero(backend, device):
    """T = 0 (no text tokens) is all-padding text: A1 = 0, as the documented rule says."""
    embq = make_module(dtype=torch.float32).to(device)
    embq.backend = backend
    hq, ht, mask, feats = make_inputs(2, 3, 4, 5, SMALL["llm_dim"], SMALL["vision_dim"],
                                      dtype=torch.float32)
    hq, ht, mask, feats = hq.to(device), ht.to(device), mask.to(device), feats.to(device)
    with torch.no_grad():
        empty = embq(hq, ht[:, :0], mask[:, :0], feats)
        assert torch.equal(empty, embq(hq, ht[:, :0], None, feats))
        # the same as a question whose every token is padding
        padded = embq(hq, ht, torch.zeros_like(mask), feats)
    assert empty.shape == hq.shape and torch.isfinite(empty).all()
    torch.testing.assert_close(empty, padded)


def test_dtype_mismatch_between_module_and_input_names_both():
    embq = make_module(dtype=torch.float32)
    hq, ht, mask, feats = make_inputs(1, 2, 3, 4, SMALL["llm_dim"], SMALL["vision_dim"],
                                      dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"query_states: dtype torch.bfloat16 does not match the "
                                        r"module's parameters' dtype torch.float32"):
        embq(hq, ht, mask, feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast handles the mix
        assert embq(hq, ht, mask, feats).dtype == torch.bfloat16


def test_torch_compile_fullgraph():
    embq = make_module(dtype=torch.float32)
    hq, ht, mask, feats = make_inputs(2, 9, 7, 10, SMALL["llm_dim"], SMALL["vision_dim"],
                                      dtype=torch.float32)
    hq.requires_grad_()
    eager = embq(hq, ht, mask, feats)
    compiled = torch.compile(embq, fullgraph=True, backend="aot_eager")
    out = compiled(hq, ht, mask, feats)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), hq)[0],
                               torch.autograd.grad(eager.sum(), hq)[0])


def test_backend_reaches_the_op(monkeypatch):
    calls = []
    real = fk.attention.module.query_patch_attention

    def spy(*args, backend=None, **kwargs):
        calls.append(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(fk.attention.module, "query_patch_attention", spy)
    embq = EmbeddedQuery(**SMALL, backend="reference")
    hq, ht, mask, feats = make_inputs(1, 2, 3, 4, SMALL["llm_dim"], SMALL["vision_dim"],
                                      dtype=torch.float32)
    embq(hq, ht, mask, feats)
    assert calls == ["reference", "reference"]


BAD_CALLS = {
    "query-rank": (lambda hq, ht, m, f: dict(query_states=hq[0]), ValueError, "query_states: expected a 3-D"),
    "query-width": (lambda hq, ht, m, f: dict(query_states=hq[..., :39]), ValueError, r"query_states: expected shape \(2, \*, 40\)"),
    "text-width": (lambda hq, ht, m, f: dict(text_states=ht[..., :39]), ValueError, r"text_states: expected shape \(2, \*, 40\)"),
    "text-batch": (lambda hq, ht, m, f: dict(text_states=ht[:1]), ValueError, r"text_states: expected shape \(2, \*, 40\)"),
    "image-width": (lambda hq, ht, m, f: dict(image_features=f[..., :23]), ValueError, r"image_features: expected shape \(2, \*, 24\)"),
    "image-batch": (lambda hq, ht, m, f: dict(image_features=f[:1]), ValueError, r"image_features: expected shape \(2, \*, 24\)"),
    "image-rank": (lambda hq, ht, m, f: dict(image_features=f[0]), ValueError, "image_features: expected a 3-D"),
    "mask-shape": (lambda hq, ht, m, f: dict(text_mask=m[:, :3]), ValueError, r"text_mask: expected shape \(2, 7\)"),
    "mask-float": (lambda hq, ht, m, f: dict(text_mask=m.float()), TypeError, "text_mask: expected a bool"),
    "mask-device": (lambda hq, ht, m, f: dict(text_mask=m.to("meta")), ValueError, "text_mask: expected a tensor on"),
    "dtype-mismatch": (lambda hq, ht, m, f: dict(text_states=ht.double()), TypeError, "text_states: expected dtype torch.float32"),
    "not-tensor": (lambda hq, ht, m, f: dict(image_features=f.tolist()), TypeError, "image_features: expected a torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_clear_error(name):
    make_kwargs, exc, pattern = BAD_CALLS[name]
    embq = EmbeddedQuery(**SMALL)
    hq, ht, mask, feats = make_inputs(2, 3, 7, 5, SMALL["llm_dim"], SMALL["vision_dim"],
                                      dtype=torch.float32)
    kwargs = dict(query_states=hq, text_states=ht, text_mask=mask, image_features=feats)
    kwargs.update(make_kwargs(hq, ht, mask, feats))
    with pytest.raises(exc, match=pattern):
        embq(**kwargs)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(down_dim=10), "down_dim: 10 is not a multiple of num_heads = 4"),
    (dict(vision_dim=30), "vision_dim: 30 is not a multiple of num_heads = 4"),
    (dict(num_heads=0), "num_heads: expected an int >= 1"),
    (dict(num_layers=0), "num_layers: expected an int >= 1"),
    (dict(down_dim=2056, num_heads=8), "exceed the attention's limit of 256"),
    (dict(backend="gpu"), "backend: expected one of"),
    (dict(llm_dim=0), "llm_dim: expected an int >= 1"),
])
def test_bad_constructor_arguments(kwargs, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        EmbeddedQuery(**{**SMALL, **kwargs})


def test_package_exports():
    assert fk.EmbeddedQuery is EmbeddedQuery
