"""The FlashSloth model on the tiny preset: modes, token counts, EmbQ placement, the fused ops,
loss, generation (cache, batching, sampling), HD, freezing and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flashsloth import FlashSloth, FlashSlothConfig, num_visual_tokens
from flashsloth.config import IGNORE_INDEX
from flashsloth.model import AveragePool
from flashsloth_kernels.testing import assert_close


def agree(name, got, want):
    """Two code paths of the same fp32 computation agree (torch's fp32 tolerances): plumbing
    checks, not kernel accuracy (that is flashsloth_kernels.testing.assert_close's job)."""
    torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")

MODES = ("flashsloth", "sap", "avgpool", "none")


def tiny(**overrides) -> FlashSloth:
    torch.manual_seed(0)
    return FlashSloth(FlashSlothConfig.preset("tiny", **overrides)).eval()


def prompt(cfg, question=(7, 8, 9), answer=(11, 12), prefix=(5, 6)):
    """[prefix] <image> [newline=3] [question] <slot> [answer]"""
    return [*prefix, cfg.image_token_id, 3, *question, cfg.query_token_id, *answer]


def pixels(cfg, batch=1):
    S = cfg.vision.image_size
    shape = (batch, cfg.num_views, 3, S, S) if cfg.hd else (batch, 3, S, S)
    return torch.randn(shape)


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.name()))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name,mode,expected", [
    ("flashsloth-3.2b", "flashsloth", 90), ("flashsloth-hd-3.2b", "flashsloth", 414),
    ("flashsloth-3.2b", "sap", 81), ("flashsloth-3.2b", "avgpool", 81),
    ("flashsloth-3.2b", "none", 729), ("flashsloth-hd-3.2b", "none", 3645),
])
def test_visual_tokens_reaching_the_llm(name, mode, expected):
    cfg = FlashSlothConfig.preset(name, compression=mode)
    assert cfg.num_visual_tokens() == expected
    if mode == "flashsloth":
        assert num_visual_tokens(name) == expected


def test_original_sizes_build_on_meta_with_the_papers_parameter_counts():
    model = FlashSloth(FlashSlothConfig.preset("flashsloth-3.2b"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters("pooling") == 1_329_409          # SAP, as the spec derives
    assert model.num_parameters("lqformer") == 8_084_416          # EmbQ
    assert model.num_parameters("learnable_tokens") == 9 * 2560
    assert len(model.vision_tower.encoder.layers) == 26
    assert len(model.language_model.layers) == 32
    assert 3.1e9 < model.num_parameters() < 3.3e9
    baseline = FlashSloth(FlashSlothConfig.preset("flashsloth-3.2b", compression="none"),
                          device="meta")
    assert baseline.pooling is None and baseline.lqformer is None
    assert model.num_parameters() - baseline.num_parameters() == 1_329_409 + 8_084_416 + 23_040


def test_unknown_preset_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match="preset"):
        FlashSlothConfig.preset("flashsloth-7b")
    with pytest.raises(ValueError, match="compression"):
        FlashSlothConfig.preset("tiny", compression="topk")
    with pytest.raises(ValueError, match="embq_layer"):
        FlashSlothConfig.preset("tiny", embq_layer=9)


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("mode", MODES)
def test_forward_token_layout_per_mode(mode):
    model = tiny(compression=mode)
    cfg = model.config
    ids = torch.tensor([prompt(cfg)])
    out = model(pixels(cfg), ids)
    text = ids.shape[1] - 2                        # the two markers are replaced
    queries = cfg.num_queries if mode == "flashsloth" else 0
    assert out.logits.shape == (1, text + cfg.num_image_tokens + queries, cfg.text.vocab_size)
    assert cfg.num_image_tokens == (36 if mode == "none" else 4)
    assert torch.isfinite(out.logits).all()


def test_hd_forward_embq_sees_every_view():
    model = tiny(hd=True)
    cfg = model.config
    seen = {}
    orig = model.lqformer.forward

    def spy(q, t, m, img):
        seen["image"] = tuple(img.shape)
        return orig(q, t, m, img)

    model.lqformer.forward = spy
    out = model(pixels(cfg, 2), torch.tensor([prompt(cfg)] * 2))
    assert cfg.num_views == 5 and cfg.num_image_tokens == 20
    assert out.logits.shape[1] == 8 + 20 + 9
    assert seen["image"] == (2, 5 * 36, cfg.vision.hidden_size)


def test_average_pool_partial_windows():
    x = torch.randn(2, 49, 5)
    got = AveragePool(3)(x)
    def loop(t):
        grid = t.reshape(2, 7, 7, 5)
        return torch.stack([grid[:, i:i + 3, j:j + 3].mean((1, 2))
                            for i in range(0, 7, 3) for j in range(0, 7, 3)], 1)

    assert_close("avgpool", got, loop(x.double()), loop(x), torch.float32, magnitude=x.abs().max().item(), n=9)


def test_sap_and_embq_run_on_the_fused_ops():
    model = tiny()
    cfg = model.config
    with OpRecorder() as rec:
        model(pixels(cfg), torch.tensor([prompt(cfg)]))
    ops = [n for n in rec.names if n.startswith("flashsloth::")]
    assert "flashsloth::spatial_attention_pool" in ops
    assert any("query_patch_attention" in n for n in ops), ops


def test_embq_updates_queries_at_its_layer_with_the_question_tokens():
    model = tiny()
    cfg = model.config
    calls = []
    orig = model.lqformer.forward

    def spy(q, t, m, img):
        out = orig(q, t, m, img)
        calls.append((q, t, m, img, out))
        return out

    model.lqformer.forward = spy
    seen = {}
    k = cfg.embq_layer - 1                             # 0-based index of the layer EmbQ feeds
    layers = model.language_model.layers
    hooks = [layers[k - 1].register_forward_hook(lambda mod, a, out: seen.update(before=out)),
             layers[k].register_forward_pre_hook(lambda mod, a: seen.update(after=a[0]))]
    px = pixels(cfg)
    ids = torch.tensor([prompt(cfg, question=(7, 8, 9, 10))])
    with torch.no_grad():
        model(px, ids)
        feats = model.encode_images(px)[1]
    for h in hooks:
        h.remove()
    assert len(calls) == 1
    q, t, m, img, out = calls[0]
    M, Q = cfg.num_image_tokens, cfg.num_queries
    question = slice(2 + M + 1, 2 + M + 1 + 4)          # after "<image>" and its newline
    slot = slice(question.stop, question.stop + Q)
    assert m.tolist() == [[True] * 4]
    agree("EmbQ queries in", q[0], seen["before"][0, slot])
    agree("EmbQ question in", t[0], seen["before"][0, question])
    agree("EmbQ patch features in", img, feats)
    assert img.shape == (1, 36, cfg.vision.hidden_size)  # un-pooled 6 x 6 patches
    agree("layer input at the slot", seen["after"][0, slot], out[0])
    rest = torch.ones(seen["after"].shape[1], dtype=torch.bool)
    rest[slot] = False
    assert torch.equal(seen["after"][0, rest], seen["before"][0, rest])


def test_embq_changes_only_positions_from_the_slot_on():
    model = tiny()
    cfg = model.config
    ids = torch.tensor([prompt(cfg)])
    px = pixels(cfg)
    with torch.no_grad():
        up = model.lqformer.up_projector
        w, b = up.weight.clone(), up.bias.clone()
        up.weight.zero_(), up.bias.zero_()             # EmbQ output = its residual input
        before = model(px, ids).logits
        up.weight.copy_(w), up.bias.copy_(b)
        up.weight.normal_(0, 0.5)
        after = model(px, ids).logits
    slot = 2 + cfg.num_image_tokens + 1 + 3
    agree("before the slot", after[:, :slot], before[:, :slot])
    assert (after[:, slot:] - before[:, slot:]).abs().max() > 1e-3


def test_multi_turn_question_spans():
    model = tiny()
    cfg = model.config
    masks = []
    orig = model.lqformer.forward

    def spy(q, t, m, img):
        masks.append(m.sum(1).tolist())
        return orig(q, t, m, img)

    model.lqformer.forward = spy
    img, slot = cfg.image_token_id, cfg.query_token_id
    # prefix image nl question slot " ASSISTANT:" answer role question2 slot answer
    ids = [5, img, 3, 7, 8, slot, 20, 21, 22, 30, 31, 40, 41, slot, 50]
    labels = [IGNORE_INDEX] * len(ids)
    for i in (7, 8, 14):                               # the answers' tokens
        labels[i] = ids[i]
    px = pixels(cfg)
    model(px, torch.tensor([ids]), labels=torch.tensor([labels]))
    model(px, torch.tensor([ids]))
    assert masks[0] == [2, 2]      # [7, 8]; [40, 41] after the answer and 2 role tokens
    # without labels (multi-turn inference) the later slot gets the first question, as the
    # original (which locates later questions only from the labels); see test_model_generation
    assert masks[1] == [2, 2]


def test_question_mask_overrides_the_default_span():
    model = tiny()
    cfg = model.config
    ids = torch.tensor([prompt(cfg)])
    px = pixels(cfg)
    qmask = torch.zeros_like(ids, dtype=torch.bool)
    qmask[0, 4:7] = True                               # 7, 8, 9: what the default picks
    with torch.no_grad():
        default = model(px, ids).logits
        same = model(px, ids, question_mask=qmask).logits
        qmask[0, 3] = True                             # also the newline
        other = model(px, ids, question_mask=qmask).logits
    agree("question_mask = default", same, default)
    assert (other - default).abs().max() > 0


def test_labels_loss_ignores_visual_query_and_masked_positions():
    model = tiny()
    cfg = model.config
    ids = torch.tensor([prompt(cfg)])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -2:] = ids[0, -2:]                       # the answer
    out = model(pixels(cfg), ids, labels=labels)
    L = out.logits.shape[1]
    assert out.labels.shape == (1, L)
    assert (out.labels != IGNORE_INDEX).sum() == 2
    query_start = 2 + cfg.num_image_tokens + 1 + 3
    assert (out.labels[0, 2:2 + cfg.num_image_tokens] == IGNORE_INDEX).all()
    assert (out.labels[0, query_start:query_start + cfg.num_queries] == IGNORE_INDEX).all()
    manual = F.cross_entropy(out.logits[0, -3:-1], ids[0, -2:])
    agree("loss", out.loss, manual)


def test_two_stage_freezing_and_gradients_through_the_fused_ops():
    model = tiny()
    model.train()
    cfg = model.config
    model.vision_tower.requires_grad_(False)
    model.language_model.requires_grad_(False)
    ids = torch.tensor([prompt(cfg)])
    labels = ids.clone()
    labels[ids < 0] = IGNORE_INDEX
    out = model(pixels(cfg), ids, labels=labels)
    out.loss.backward()
    for name in ("pooling", "mm_projector", "learnable_tokens", "lqformer"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is None for p in model.language_model.parameters())


def test_bfloat16_forward_runs():
    model = tiny().to(torch.bfloat16)
    cfg = model.config
    out = model(pixels(cfg), torch.tensor([prompt(cfg)]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


# ---------------------------------------------------------------------------- generation
@pytest.mark.parametrize("overrides", [{}, {"hd": True}, {"compression": "none"}],
                         ids=["flashsloth", "hd", "none"])
def test_cached_generation_equals_uncached(overrides):
    model = tiny(**overrides)
    cfg = model.config
    px = pixels(cfg, 2)
    ids = torch.tensor([prompt(cfg), prompt(cfg, question=(20, 21, 22))])
    cached = model.generate(px, ids, max_new_tokens=6, eos_token_id=None)
    uncached = model.generate(px, ids, max_new_tokens=6, eos_token_id=None, use_cache=False)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, uncached)


def test_embq_runs_in_prefill_only():
    model = tiny()
    cfg = model.config
    count = {"n": 0}
    orig = model.lqformer.forward

    def spy(*args):
        count["n"] += 1
        return orig(*args)

    model.lqformer.forward = spy
    model.generate(pixels(cfg), torch.tensor([prompt(cfg)]), max_new_tokens=5, eos_token_id=None)
    assert count["n"] == 1


def test_batched_left_padded_generation_equals_per_sample():
    model = tiny()
    cfg = model.config
    rows = [prompt(cfg), prompt(cfg, question=(30, 31, 32, 33, 34, 35), prefix=(5,)),
            prompt(cfg, question=(40,), prefix=(5, 6, 7, 8))]
    px = pixels(cfg, 3)
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    batched = model.generate(px, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    for i, r in enumerate(rows):
        alone = model.generate(px[i:i + 1], torch.tensor([r]), max_new_tokens=6, eos_token_id=None)
        assert torch.equal(batched[i], alone[0]), i


def test_sampling_is_reproducible_and_cache_independent():
    model = tiny()
    cfg = model.config
    px, ids = pixels(cfg), torch.tensor([prompt(cfg)])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.9,
              eos_token_id=None)
    a = model.generate(px, ids, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(px, ids, generator=torch.Generator().manual_seed(3), **kw)
    c = model.generate(px, ids, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_generation_pads_after_eos():
    model = tiny()
    cfg = model.config
    px, ids = pixels(cfg), torch.tensor([prompt(cfg)])
    first = model.generate(px, ids, max_new_tokens=4, eos_token_id=None)
    eos = int(first[0, 1])
    out = model.generate(px, ids, max_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    assert out[0, 1] == eos
    assert (out[0, 2:] == 0).all() or out.shape[1] == 2


def test_prefill_and_decode_entry_points():
    model = tiny()
    cfg = model.config
    px, ids = pixels(cfg), torch.tensor([prompt(cfg)])
    logits, cache = model.prefill(px, ids, max_new_tokens=3)
    full = model(px, ids).logits
    agree("prefill logits", logits, full[:, -1])
    assert cache.length == full.shape[1] and cache.max_len == full.shape[1] + 3
    step = model.decode_step(logits.argmax(-1), cache)
    assert step.shape == (1, cfg.text.vocab_size)


# ---------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    model = tiny()
    cfg = model.config
    px, ids = pixels(cfg), torch.tensor([prompt(cfg)])
    with pytest.raises(ValueError, match=r"images: expected pixel values of shape "
                                         r"\(B, 3, 84, 84\)"):
        model(torch.randn(1, 3, 64, 64), ids)
    with pytest.raises(ValueError, match="batch"):
        model(pixels(cfg, 2), ids)
    with pytest.raises(ValueError, match="no image marker"):
        model(px, torch.tensor([[5, 6, cfg.query_token_id]]))
    with pytest.raises(ValueError, match="more than one image"):
        model(px, torch.tensor([[cfg.image_token_id, 5, cfg.image_token_id, cfg.query_token_id]]))
    with pytest.raises(ValueError, match="no query slot"):
        model(px, torch.tensor([[cfg.image_token_id, 5, 6]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(px, torch.tensor([[cfg.image_token_id, 5, 5000, cfg.query_token_id]]))
    with pytest.raises(ValueError, match="labels: expected shape"):
        model(px, ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="but no images were given"):
        model(None, ids)
    with pytest.raises(ValueError, match="exceed the context of 512"):
        model(px, torch.tensor([prompt(cfg, question=tuple(range(10, 510)))]))
    with pytest.raises(ValueError, match="max_new_tokens 600"):
        model.generate(px, ids, max_new_tokens=600)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(px, ids, max_new_tokens=0)
    with pytest.raises(TypeError, match="input_ids"):
        model(px, [1, 2, 3])


def test_baselines_accept_the_same_prompt_without_using_the_slot():
    model = tiny(compression="sap")
    cfg = model.config
    with_slot = model(pixels(cfg), torch.tensor([prompt(cfg)])).logits
    assert with_slot.shape[1] == 8 + cfg.num_image_tokens
    out = model(pixels(cfg), torch.tensor([[cfg.image_token_id, 5, 6]]))
    assert out.logits.shape[1] == 2 + cfg.num_image_tokens


def test_text_only_forward():
    model = tiny()
    cfg = model.config
    out = model(None, torch.tensor([[5, 6, 7, cfg.query_token_id, 8]]))
    assert out.logits.shape[1] == 4 + cfg.num_queries
    assert math.isfinite(float(out.logits.detach().abs().max()))
