"""Checkpoints in the original FlashSloth layout: names, round trips, shards, .bin without
unpickling, the keys tolerated on load and the errors that list what does not fit."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flashsloth import CheckpointError, FlashSloth, FlashSlothConfig
from flashsloth.checkpoint import from_original_key, to_original_key

ORIGINAL_KEYS = [
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
    "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.1.self_attn.out_proj.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.layer_norm2.bias",
    "model.pooling.mlp.0.weight", "model.pooling.mlp.3.bias",
    "model.mm_projector.0.weight", "model.mm_projector.2.bias",
    "model.learnable_tokens.token",
    "model.lqformer.down_projector_learnable_text.weight",
    "model.lqformer.layers.0.i2q_attn.v_proj.weight", "model.lqformer.up_projector.bias",
    "model.embed_tokens.weight", "model.layers.3.self_attn.dense.weight",
    "model.layers.0.input_layernorm.weight", "model.layers.2.mlp.fc2.bias",
    "model.final_layernorm.weight", "lm_head.weight", "lm_head.bias",
]


def tiny(**overrides):
    torch.manual_seed(0)
    return FlashSloth(FlashSlothConfig.preset("tiny", **overrides)).eval()


def inputs(cfg):
    ids = torch.tensor([[5, cfg.image_token_id, 3, 7, 8, cfg.query_token_id, 9]])
    return torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size), ids


def stored(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_saved_keys_are_the_original_names(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert set(ORIGINAL_KEYS) <= keys
    assert all(from_original_key(k) is not None for k in keys)
    assert {to_original_key(k) for k in model.state_dict()} == keys
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "flashsloth" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["num_hidden_layers"] == 4 and cfg["hidden_size"] == 64


def test_round_trip_gives_the_same_logits(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path))
    loaded = FlashSloth.from_pretrained(str(tmp_path))
    assert loaded.config == model.config and loaded.dtype == torch.float32
    px, ids = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(px, ids).logits, model(px, ids).logits)


def test_sharded_save_and_dtype_on_load(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path), max_shard_bytes=200_000)
    names = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 2
    loaded = FlashSloth.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ref = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_bin_checkpoints_load_without_unpickling(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path))
    state = stored(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = FlashSloth.from_pretrained(str(tmp_path))
    px, ids = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(px, ids).logits, model(px, ids).logits)


class _Payload:
    def __reduce__(self):
        return (os.makedirs, (os.path.join(os.environ["FLASHSLOTH_TEST_MARKER"], "pwned"),))


def test_a_pickle_payload_is_refused_not_run(tmp_path, monkeypatch):
    tiny().save_pretrained(str(tmp_path))
    state = stored(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    monkeypatch.setenv("FLASHSLOTH_TEST_MARKER", str(tmp_path))
    torch.save({**state, "evil": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        FlashSloth.from_pretrained(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path):
    tiny().save_pretrained(str(tmp_path))
    state = stored(str(tmp_path))
    del state["model.pooling.mlp.0.bias"]
    state["model.mystery.weight"] = torch.zeros(2)
    state["model.mm_projector.0.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        FlashSloth.from_pretrained(str(tmp_path))
    msg = str(err.value)
    assert "missing keys (1): model.pooling.mlp.0.bias" in msg
    assert "unexpected keys (1): model.mystery.weight" in msg
    assert "model.mm_projector.0.weight (checkpoint [3, 3], model [64, 48])" in msg


def test_unused_original_keys_are_tolerated(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path))
    state = stored(str(tmp_path))
    vis = "model.vision_tower.vision_tower.vision_model."
    extra = {
        vis + "post_layernorm.weight": torch.ones(48), vis + "post_layernorm.bias": torch.zeros(48),
        vis + "head.probe": torch.zeros(1, 1, 48), vis + "head.mlp.fc1.weight": torch.zeros(96, 48),
        vis + "embeddings.position_ids": torch.arange(36)[None],
        vis + "encoder.layers.2.mlp.fc1.weight": torch.zeros(96, 48),   # the layer the cut drops
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(3),
    }
    save_file({**state, **extra}, str(tmp_path / "model.safetensors"))
    loaded = FlashSloth.from_pretrained(str(tmp_path))
    px, ids = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(px, ids).logits, model(px, ids).logits)


@pytest.mark.parametrize("mode", ["sap", "avgpool", "none"])
def test_a_flashsloth_checkpoint_loads_into_the_baselines(tmp_path, mode):
    tiny().save_pretrained(str(tmp_path))
    loaded = FlashSloth.from_pretrained(str(tmp_path), compression=mode)
    assert loaded.config.compression == mode and loaded.lqformer is None
    px, ids = inputs(loaded.config)
    assert loaded(px, ids).logits.shape[1] == 5 + loaded.config.num_image_tokens


def test_original_config_json_without_this_packages_block(tmp_path):
    # sizes an original config.json can describe: SigLIP heads of 72 dims, EmbQ heads = LLM
    # heads, EmbQ at layer 8, the original token ids
    cfg = FlashSlothConfig.preset(
        "tiny", vision={"hidden_size": 144, "num_attention_heads": 2, "intermediate_size": 96},
        text={"num_hidden_layers": 8}, embq_layer=8, query_token_id=50295)
    torch.manual_seed(0)
    model = FlashSloth(cfg).eval()
    model.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "config.json").read_text())
    del data["flashsloth_kernels"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = FlashSloth.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    px, ids = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(px, ids).logits, model(px, ids).logits)


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError):
        FlashSloth.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no weights"):
        FlashSloth.from_pretrained(str(tmp_path))
    tiny().save_pretrained(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        FlashSloth.from_pretrained(str(tmp_path))


def test_meta_models_cannot_be_saved(tmp_path):
    model = FlashSloth(FlashSlothConfig.preset("tiny"), device="meta")
    with pytest.raises(ValueError, match="meta"):
        model.save_pretrained(str(tmp_path))
