"""The slim model's language model and vision tower against HF transformers' independent
implementations (PhiForCausalLM, SiglipVisionModel) on tiny random configs with shared weights.

transformers is a test-only dependency; nothing here downloads anything.
"""

import pytest
import torch

from flashsloth.config import TextConfig, VisionConfig
from flashsloth.language import KVCache, PhiLanguageModel
from flashsloth.vision import SiglipVisionTower
from flashsloth_kernels.testing import assert_close

transformers = pytest.importorskip("transformers")

TEXT = TextConfig(vocab_size=512, hidden_size=80, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=256,
                  resid_pdrop=0.0)
VISION = VisionConfig(image_size=70, patch_size=14, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=4, select_layer=-2)


def _randomize(module: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (LayerNorm gains and biases included)."""
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                base = 1.0 if isinstance(m, torch.nn.LayerNorm) and name == "weight" else 0.0
                p.copy_(base + 0.1 * torch.randn_like(p))


def hf_phi(cfg: TextConfig):
    hf_cfg = transformers.PhiConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        partial_rotary_factor=cfg.partial_rotary_factor,
        rope_theta=cfg.rope_theta, layer_norm_eps=cfg.layer_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0, hidden_act="gelu_new")
    hf_cfg._attn_implementation = "eager"
    model = transformers.PhiForCausalLM(hf_cfg).eval()
    _randomize(model)
    return model


def phi_from_hf(hf_model, cfg: TextConfig) -> PhiLanguageModel:
    """Our LM with HF's weights: model.X -> X, lm_head.X -> lm_head.X."""
    ours = PhiLanguageModel(cfg).eval()
    state = {}
    for k, v in hf_model.state_dict().items():
        if k.startswith("model."):
            k = k[len("model."):]
        if k.endswith("rotary_emb.inv_freq") or k.endswith("original_inv_freq"):
            continue
        state[k] = v
    ours.load_state_dict(state, strict=True)
    return ours


def test_phi_logits_match_transformers():
    hf = hf_phi(TEXT)
    ours = phi_from_hf(hf, TEXT)
    ids = torch.randint(0, TEXT.vocab_size, (2, 37))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ours.embed_tokens(ids))
        ref64 = hf.double()(input_ids=ids).logits
    # expected: transformers in float64; baseline: transformers in fp32 (the input precision)
    assert_close("phi logits", got, ref64, ref, torch.float32)


def test_phi_left_padding_matches_transformers():
    hf = hf_phi(TEXT)
    ours = phi_from_hf(hf, TEXT)
    ids = torch.randint(0, TEXT.vocab_size, (3, 19))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :5] = False
    mask[2, :11] = False
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
        got = ours(ours.embed_tokens(ids), attention_mask=mask)
        alone = ours(ours.embed_tokens(ids[2:, 11:]))
        # expected: transformers in float64 on each row's real tokens alone (its own float64
        # left padding turns padded rows into NaN that then reaches the real ones)
        hf.double()
        rows64 = [hf(input_ids=ids[b, mask[b]][None]).logits[0] for b in range(ids.shape[0])]
    ref64 = torch.cat(rows64)
    assert_close("phi logits (left-padded, real positions)", got[mask], ref64, ref[mask],
                 torch.float32)
    # a padded row computes what the same tokens compute alone (baseline: ours, alone, fp32)
    assert_close("padded row vs alone", got[2:, 11:], rows64[2][None], alone, torch.float32)


def test_phi_kv_cache_matches_full_forward():
    hf = hf_phi(TEXT)
    ours = phi_from_hf(hf, TEXT)
    ids = torch.randint(0, TEXT.vocab_size, (2, 16))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        full = ours(ours.embed_tokens(ids), attention_mask=mask)
        cache = KVCache.for_model(ours, 2, 16)
        steps = [ours(ours.embed_tokens(ids[:, :10]), attention_mask=mask[:, :10], cache=cache)]
        for t in range(10, 16):
            steps.append(ours(ours.embed_tokens(ids[:, t:t + 1]), cache=cache))
    got = torch.cat(steps, 1)
    with torch.no_grad():
        ours.double()
        full64 = ours(ours.embed_tokens(ids), attention_mask=mask)
    assert_close("cached logits", got[mask], full64[mask], full[mask], torch.float32)


def test_phi_context_limit_is_a_clear_error():
    ours = PhiLanguageModel(TEXT)
    with pytest.raises(ValueError, match="exceed the context of 256"):
        ours(torch.zeros(1, 257, TEXT.hidden_size))


def hf_siglip(cfg: VisionConfig):
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu_pytorch_tanh")
    hf_cfg._attn_implementation = "eager"
    model = transformers.SiglipVisionModel(hf_cfg).eval()
    _randomize(model)
    return model


def siglip_from_hf(hf_model, cfg: VisionConfig) -> SiglipVisionTower:
    """Our tower with HF's weights; HF's post_layernorm, head and the cut layers are dropped."""
    ours = SiglipVisionTower(cfg).eval()
    wanted = set(ours.state_dict())
    state = {}
    for k, v in hf_model.state_dict().items():
        k = k[len("vision_model."):] if k.startswith("vision_model.") else k
        if k in wanted:
            state[k] = v
    ours.load_state_dict(state, strict=True)
    return ours


def test_siglip_features_match_transformers_second_to_last_layer():
    hf = hf_siglip(VISION)
    ours = siglip_from_hf(hf, VISION)
    px = torch.randn(2, 3, VISION.image_size, VISION.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        got = ours(px)
        ref64 = hf.double()(pixel_values=px.double(), output_hidden_states=True).hidden_states[-2]
    assert got.shape == (2, (VISION.image_size // VISION.patch_size) ** 2, VISION.hidden_size)
    assert len(ours.encoder.layers) == VISION.num_hidden_layers - 1
    assert_close("siglip features", got, ref64, ref, torch.float32)


def test_siglip_so400m_sizes_on_meta():
    cfg = VisionConfig()
    with torch.device("meta"):
        tower = SiglipVisionTower(cfg)
    out = tower(torch.empty(1, 3, 384, 384, device="meta"))
    assert tuple(out.shape) == (1, 729, 1152)
    assert len(tower.encoder.layers) == 26
