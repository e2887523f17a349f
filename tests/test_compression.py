"""The peers' compression modes (flashsloth/compression/): visionzip, fastv, random, downsample.

Each module against its plain reference; each mode inside the model: token counts, cached
generation, batching, checkpoints, and a training step through the package's trainer.
FLOP and token counts against closed forms are in tests/test_flops.py.
"""

import math

import pytest
import torch

from flashsloth import FlashSloth, FlashSlothConfig
from flashsloth.compression import (
    Downsample,
    RandomSelect,
    VisionZip,
    downsample_reference,
    fastv_keep_reference,
    grid_shape,
    keep_positions,
    last_token_attention,
    random_patch_indices,
    random_reference,
    visionzip_reference,
)
from flashsloth.compression.downsample import resize_weights
from flashsloth.config import IGNORE_INDEX, PEER_COMPRESSIONS
from flashsloth.language import KVCache, TokenPruning, rotary_cos_sin

PEERS = list(PEER_COMPRESSIONS)


def tiny(**overrides):
    torch.manual_seed(0)
    return FlashSloth(FlashSlothConfig.preset("tiny", **overrides)).eval()


def prompt(cfg, batch=1, question=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 700, (batch, 4), generator=g),
                     torch.full((batch, 1), cfg.image_token_id),
                     torch.randint(3, 700, (batch, question), generator=g),
                     torch.full((batch, 1), cfg.query_token_id),
                     torch.randint(3, 700, (batch, 2), generator=g)], 1)
    S = cfg.vision.image_size
    shape = (batch, cfg.num_views, 3, S, S) if cfg.hd else (batch, 3, S, S)
    return ids, torch.rand(shape, generator=g) * 2 - 1


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("preset,mode,per_view,entering,kept", [
    ("flashsloth-3.2b", "visionzip", 81, 81, 81),
    ("flashsloth-3.2b", "random", 81, 81, 81),
    ("flashsloth-3.2b", "downsample", 81, 81, 81),
    ("flashsloth-3.2b", "fastv", 729, 729, 81),
    ("flashsloth-hd-3.2b", "visionzip", 81, 405, 405),
    ("flashsloth-hd-3.2b", "fastv", 729, 3645, 405),
    ("tiny", "random", 4, 4, 4),
    ("tiny", "fastv", 36, 36, 4),
])
def test_default_budget_is_flashsloths(preset, mode, per_view, entering, kept):
    cfg = FlashSlothConfig.preset(preset, compression=mode)
    assert cfg.tokens_per_view == per_view
    assert cfg.num_visual_tokens() == entering
    assert cfg.num_visual_tokens_kept() == kept


def test_budget_is_selectable():
    cfg = FlashSlothConfig.preset("flashsloth-3.2b", compression="downsample", token_budget=90)
    assert cfg.num_visual_tokens() == 90 and Downsample(90).out_hw == (9, 10)
    cfg = FlashSlothConfig.preset("flashsloth-3.2b", compression="visionzip", token_budget=64)
    assert cfg.visionzip_split == (54, 10)            # VisionZip's own split of 64
    cfg = cfg.replace(visionzip_contextual=0)
    assert cfg.visionzip_split == (64, 0)
    cfg = FlashSlothConfig.preset("flashsloth-hd-3.2b", compression="fastv", token_budget=10)
    assert cfg.num_visual_tokens() == 3645 and cfg.num_visual_tokens_kept() == 50


@pytest.mark.parametrize("field,value,match", [
    ("token_budget", 0, "token_budget"), ("token_budget", 37, "token_budget"),
    ("token_budget", True, "token_budget"), ("visionzip_contextual", 4, "visionzip_contextual"),
    ("visionzip_contextual", -1, "visionzip_contextual"), ("fastv_layer", 0, "fastv_layer"),
    ("compression_seed", 1.5, "compression_seed"),
])
def test_bad_peer_fields_are_clear_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        FlashSlothConfig.preset("tiny", compression="visionzip", **{field: value})


def test_fastv_layer_must_leave_layers_to_prune():
    with pytest.raises(ValueError, match="fastv_layer"):
        FlashSlothConfig.preset("tiny", compression="fastv", fastv_layer=4)   # 4 layers
    FlashSlothConfig.preset("tiny", compression="none", fastv_layer=4)       # unused: fine
    FlashSlothConfig.preset("tiny", compression="fastv", fastv_layer=3)


# ---------------------------------------------------------------- downsample
def test_grid_shape_is_the_most_square_factorisation():
    assert [grid_shape(k) for k in (81, 90, 4, 7, 1, 64)] == [
        (9, 9), (9, 10), (2, 2), (1, 7), (1, 1), (8, 8)]
    with pytest.raises(ValueError, match="tokens"):
        grid_shape(0)


@pytest.mark.parametrize("g,tokens", [(27, 81), (27, 90), (6, 4), (7, 6), (5, 25)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_downsample_matches_reference(g, tokens, dtype):
    x = torch.randn(3, g * g, 5, dtype=dtype)
    out = Downsample(tokens)(x)
    assert out.shape == (3, tokens, 5) and out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), downsample_reference(x, tokens), rtol=tol,
                               atol=tol)


def test_downsample_averages_a_constant_and_every_patch_counts():
    x = torch.full((1, 729, 2), 3.0)
    torch.testing.assert_close(Downsample(81)(x), torch.full((1, 81, 2), 3.0))
    # every one of the 27 input rows / columns contributes (plain bilinear would skip 2 of 3)
    assert bool((resize_weights(27, 9).sum(0) > 0).all())


def test_downsample_bfloat16_and_meta():
    x = torch.randn(2, 729, 8)
    out = Downsample(81)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), Downsample(81)(x), rtol=2e-2, atol=2e-2)
    assert Downsample(81)(x.to("meta")).shape == (2, 81, 8)


# ---------------------------------------------------------------- random
def test_random_selection_matches_reference_and_is_seeded():
    x = torch.randn(4, 36, 3)
    sel = RandomSelect(5, views=2, seed=3)
    idx = sel.indices(4, 36)
    torch.testing.assert_close(sel(x), random_reference(x, idx), rtol=0, atol=0)
    assert torch.equal(idx[0], idx[2]) and torch.equal(idx[1], idx[3])   # per view position
    assert not torch.equal(idx[0], idx[1])
    assert bool((idx[:, 1:] > idx[:, :-1]).all())                          # raster order
    assert torch.equal(RandomSelect(5, views=2, seed=3).indices(4, 36), idx)
    assert not torch.equal(RandomSelect(5, views=2, seed=4).indices(4, 36), idx)


def test_random_selection_is_uniform_over_seeds():
    N, k, draws = 36, 4, 3000
    counts = torch.zeros(N)
    for s in range(draws):
        counts[random_patch_indices(1, N, k, s)[0]] += 1
    expected = draws * k / N                      # 333.3 each; binomial sd ~ 17.6
    assert float((counts - expected).abs().max()) < 5 * math.sqrt(expected * (1 - k / N))


# ---------------------------------------------------------------- visionzip
def _tower_attention(dtype=torch.float64):
    cfg = FlashSlothConfig.preset("tiny", compression="visionzip")
    model = tiny(compression="visionzip").to(dtype).requires_grad_(False)
    with torch.no_grad():      # peaked attention: no near-ties in the ranking of patches
        for m in model.vision_tower.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.3)
    px = torch.randn(3, 3, 84, 84, dtype=dtype)
    return cfg, model, px


@pytest.mark.parametrize("dominant,contextual", [(3, 1), (2, 2), (4, 0), (1, 3), (30, 6)])
def test_visionzip_matches_reference(dominant, contextual):
    _, model, px = _tower_attention()
    feats, probs, keys = model.vision_tower(px, return_attention=True)
    out = VisionZip(dominant, contextual)(feats, probs, keys)
    assert out.shape == (3, dominant + contextual, feats.shape[-1])
    ref = visionzip_reference(feats, probs, keys, dominant, contextual)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_visionzip_keeps_the_patches_receiving_most_attention():
    """SigLIP has no CLS token: dominance is the mean attention a patch receives."""
    _, model, px = _tower_attention()
    feats, probs, keys = model.vision_tower(px, return_attention=True)
    received = probs.mean(dim=(1, 2))
    top = received.topk(3, dim=1).indices.sort(1).values
    out = VisionZip(3, 1)(feats, probs, keys)
    for b in range(3):
        torch.testing.assert_close(out[b, :3], feats[b, top[b]])


def test_tower_attention_output_equals_the_sdpa_features():
    _, model, px = _tower_attention(torch.float32)
    feats, probs, keys = model.vision_tower(px, return_attention=True)
    torch.testing.assert_close(feats, model.vision_tower(px), rtol=1e-5, atol=1e-5)
    assert probs.dtype == torch.float32 and probs.shape == (3, 4, 36, 36)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 36))
    assert keys.shape == (3, 4, 36, 12)


def test_visionzip_bad_inputs():
    f = torch.randn(2, 36, 8)
    with pytest.raises(ValueError, match="probs"):
        VisionZip(3, 1)(f, torch.rand(2, 4, 36, 35), torch.randn(2, 4, 36, 2))
    with pytest.raises(ValueError, match="keys"):
        VisionZip(3, 1)(f, torch.rand(2, 4, 36, 36), torch.randn(2, 4, 35, 2))
    with pytest.raises(ValueError, match="only 36"):
        VisionZip(30, 7)(f, torch.rand(2, 4, 36, 36), torch.randn(2, 4, 36, 2))


# ---------------------------------------------------------------- fastv
def _lm_inputs(model, ids, px, attention_mask=None):
    embeds, layout, _ = model.prepare_inputs(px, ids, attention_mask)
    lm = model.language_model
    cos, sin = rotary_cos_sin(layout.position_ids, lm.config.rotary_dim, lm.config.rope_theta,
                              embeds.dtype)
    return embeds, layout, cos, sin


def test_fastv_ranking_matches_the_full_attention_matrix():
    model = tiny(compression="fastv").double()
    ids, px = prompt(model.config, batch=3)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False                                      # a left-padded row
    embeds, layout, cos, sin = _lm_inputs(model, ids, px.double(), mask)
    layer = model.language_model.layers[0]
    visual = layout.index > ids.numel()
    qpos = torch.tensor([layout.length - 1, layout.length - 1, layout.length - 4])
    scores = last_token_attention(layer, embeds, cos, sin, layout.attention_mask, qpos)
    keep = keep_positions(scores, visual, layout.attention_mask, 5)
    ref = fastv_keep_reference(layer, embeds, cos, sin, layout.attention_mask, visual, 5, qpos)
    for b in range(3):
        assert [int(j) for j in keep[b] if j >= 0] == ref[b]
    assert int((keep[1] < 0).sum()) == 3                     # padding stays padding


def _masked_reference_logits(model, ids, px, keep_layer):
    """FastV as masks: the full sequence in every layer, but from layer K on every query sees
    only the kept keys. The kept positions' outputs must equal the pruned run's."""
    embeds, layout, cos, sin = _lm_inputs(model, ids, px)
    lm = model.language_model
    plan = model.token_pruning(layout, ids.numel())
    L = layout.length
    h = h_prev = embeds
    keep_set = None
    for i, layer in enumerate(lm.layers):
        if i == plan.layer:
            keep = plan.select(lm.layers[i - 1], h_prev, cos, sin, layout.attention_mask)
            keep_set = keep[0]
        if keep_set is None:
            mask = None
        else:
            allowed = torch.zeros(L, dtype=torch.bool)
            allowed[keep_set] = True
            mask = (torch.ones(L, L, dtype=torch.bool).tril() & allowed[None])
            mask = mask | torch.eye(L, dtype=torch.bool)
            mask = mask[None, None]
        h_prev = h
        h = layer(h, cos, sin, mask, None, i)
    return lm.lm_head(lm.final_layernorm(h))[:, keep_set], keep_set


def test_fastv_prefill_equals_masking_the_dropped_keys():
    model = tiny(compression="fastv").double()
    ids, px = prompt(model.config)
    out = model(px.double(), ids)
    ref, keep = _masked_reference_logits(model, ids, px.double(), 2)
    assert out.logits.shape[1] == len(keep) == ids.shape[1] - 2 + 4
    torch.testing.assert_close(out.logits, ref, rtol=1e-10, atol=1e-10)
    logits, _ = model.prefill(px.double(), ids)
    torch.testing.assert_close(logits, ref[:, -1], rtol=1e-10, atol=1e-10)


def test_fastv_kv_cache_shrinks_after_layer_k():
    model = tiny(compression="fastv")
    cfg = model.config
    ids, px = prompt(cfg)
    L = ids.shape[1] - 2 + 36
    _, cache = model.prefill(px, ids, max_new_tokens=3)
    assert [t.shape[2] for t in cache.k] == [L + 3, L + 3, L - 32 + 3, L - 32 + 3]
    assert cache.length == L and cache.pruned_length == L - 32 and cache.pruned_layer == 2


def test_fastv_cached_decoding_equals_rerunning_with_the_same_tokens_kept():
    """Decoding on the pruned cache = the whole sequence rerun with the prefill's choice."""
    model = tiny(compression="fastv").double()
    ids, px = prompt(model.config)
    new = model.generate(px.double(), ids, max_new_tokens=5, eos_token_id=None)
    embeds, layout, _ = model.prepare_inputs(px.double(), ids)
    plan = model.token_pruning(layout, ids.numel())
    lm = model.language_model
    lm(embeds, layout.attention_mask, layout.position_ids, pruning=plan, logits_to_keep=1)
    first_keep = plan.keep
    seq = ids
    for step in range(new.shape[1] - 1):
        seq = torch.cat([seq, new[:, step:step + 1]], 1)
        emb, lay, _ = model.prepare_inputs(px.double(), seq)
        n = lay.length - layout.length
        keep = torch.cat([first_keep, layout.length + torch.arange(n)[None]], 1)
        fixed = TokenPruning(plan.layer, keep.shape[1], lambda *a, keep=keep: keep)
        logits = lm(emb, lay.attention_mask, lay.position_ids, pruning=fixed,
                    logits_to_keep=1)[:, -1]
        assert int(logits.argmax(-1)) == int(new[0, step + 1])


def test_fastv_training_choice_does_not_see_the_answer():
    model = tiny(compression="fastv")
    cfg = model.config
    ids, px = prompt(cfg)
    answer = torch.randint(3, 700, (1, 4))
    picks = []
    for ans in (answer, answer.flip(1) + 1):
        seq = torch.cat([ids, ans], 1)
        labels = torch.cat([torch.full_like(ids, IGNORE_INDEX), ans], 1)
        embeds, layout, _ = model.prepare_inputs(px, seq, labels=labels)
        plan = model.token_pruning(layout, seq.numel())
        model.language_model(embeds, layout.attention_mask, layout.position_ids, pruning=plan)
        picks.append(plan.keep)
    assert torch.equal(picks[0], picks[1])
    out = model(px, torch.cat([ids, answer], 1),
                labels=torch.cat([torch.full_like(ids, IGNORE_INDEX), answer], 1))
    assert out.logits.shape[1] == out.labels.shape[1] == ids.shape[1] - 2 + 4 + 4
    assert int((out.labels != IGNORE_INDEX).sum()) == 4


def test_token_pruning_is_refused_where_it_cannot_act():
    model = tiny(compression="fastv")
    lm = model.language_model
    h = torch.randn(1, 6, 64)
    plan = TokenPruning(2, 3, lambda *a: torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="cache was not built"):
        lm(h, cache=KVCache.for_model(lm, 1, 8), pruning=plan)
    with pytest.raises(ValueError, match="planned"):
        lm(h, pruning=TokenPruning(2, 4, lambda *a: torch.tensor([[0, 1, 2]])))
    with pytest.raises(ValueError, match="layer in 1..3"):
        lm(h, pruning=TokenPruning(0, 3, lambda *a: torch.tensor([[0, 1, 2]])))


# ---------------------------------------------------------------- every peer in the model
@pytest.mark.parametrize("mode", PEERS)
def test_peer_modes_in_the_model(mode):
    model = tiny(compression=mode)
    cfg = model.config
    ids, px = prompt(cfg)
    out = model(px, ids)
    text = ids.shape[1] - 2
    assert out.logits.shape == (1, text + cfg.num_visual_tokens_kept(), cfg.text.vocab_size)
    assert model.num_parameters("pooling") == 0
    assert model.num_parameters() == tiny(compression="none").num_parameters()


@pytest.mark.parametrize("mode", ["visionzip", "random", "downsample"])
def test_cached_generation_equals_uncached(mode):
    model = tiny(compression=mode)
    ids, px = prompt(model.config)
    a = model.generate(px, ids, max_new_tokens=6, eos_token_id=None)
    b = model.generate(px, ids, max_new_tokens=6, eos_token_id=None, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", PEERS)
def test_left_padded_batch_equals_per_sample(mode):
    model = tiny(compression=mode).double()
    cfg = model.config
    ids_a, px_a = prompt(cfg, question=5, seed=1)
    ids_b, px_b = prompt(cfg, question=2, seed=2)
    pad = ids_a.shape[1] - ids_b.shape[1]
    ids = torch.cat([ids_a, torch.cat([torch.zeros(1, pad, dtype=torch.long), ids_b], 1)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :pad] = False
    px = torch.cat([px_a, px_b]).double()
    batched, _ = model.prefill(px, ids, mask)
    for row, (i, p) in enumerate(((ids_a, px_a), (ids_b, px_b))):
        alone, _ = model.prefill(p.double(), i)
        torch.testing.assert_close(batched[row], alone[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", PEERS)
def test_hd_views(mode):
    model = tiny(compression=mode, hd=True)
    cfg = model.config
    ids, px = prompt(cfg)
    out = model(px, ids)
    assert out.logits.shape[1] == ids.shape[1] - 2 + cfg.num_visual_tokens_kept()
    assert cfg.num_visual_tokens_kept() == 5 * 4


@pytest.mark.parametrize("mode", PEERS)
def test_a_flashsloth_checkpoint_runs_in_every_peer_mode(mode, tmp_path):
    tiny().save_pretrained(str(tmp_path))
    loaded = FlashSloth.from_pretrained(str(tmp_path), compression=mode)
    assert loaded.config.compression == mode
    ids, px = prompt(loaded.config)
    assert torch.isfinite(loaded(px, ids).logits).all()


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("mode", PEERS)
def test_every_peer_mode_trains_through_the_trainer(mode, stage):
    """Forward + backward + optimizer step with flashsloth.train, as the grounding experiment
    runs it: adding a mode there is one line."""
    from flashsloth.train import build_optimizer, configure_stage, random_batch, train_step

    model = tiny(compression=mode).train()
    names = configure_stage(model, stage)
    assert all(not n.startswith(("pooling", "token_pruner")) for n in names)
    opt = build_optimizer(model, stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = random_batch(model.config, 2, question_tokens=5, answer_tokens=4,
                         generator=torch.Generator().manual_seed(0))
    result = train_step(model, batch, opt)
    assert math.isfinite(result.loss) and result.tokens == 2 * 4 and result.grad_norm > 0
    changed = [n for n, p in model.named_parameters() if n in before
               and not torch.equal(p, before[n])]
    assert "mm_projector.0.weight" in changed
    if stage == 2:
        assert any(n.startswith("language_model.") for n in changed)
