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


# ---------------------------------------------------------------- saves replace atomically
def test_unsharded_save_after_a_sharded_one_reloads_the_new_weights(tmp_path):
    path = str(tmp_path / "ckpt")
    model = tiny()
    model.save_pretrained(path, max_shard_bytes=200_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")          # a file of the user's
    (tmp_path / "ckpt" / "notes").mkdir()
    (tmp_path / "ckpt" / "notes" / "a.txt").write_text("kept")
    with torch.no_grad():
        model.mm_projector[2].bias.fill_(42.0)
    model.save_pretrained(path)
    names = sorted(os.listdir(path))
    assert names == ["config.json", "model.safetensors", "notes", "tokenizer.json"], names
    assert (tmp_path / "ckpt" / "notes" / "a.txt").read_text() == "kept"
    loaded = FlashSloth.from_pretrained(path)
    assert torch.all(loaded.mm_projector[2].bias == 42.0)
    # and back to sharded: the single file is gone, the new shards win
    with torch.no_grad():
        model.mm_projector[2].bias.fill_(7.0)
    model.save_pretrained(path, max_shard_bytes=200_000)
    assert "model.safetensors" not in os.listdir(path)
    assert torch.all(FlashSloth.from_pretrained(path).mm_projector[2].bias == 7.0)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no leftovers


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    model = tiny()
    model.save_pretrained(path)
    before = sorted(os.listdir(path))
    import flashsloth.checkpoint as ck

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "_write_weights", boom)
    with torch.no_grad():
        model.mm_projector[2].bias.fill_(42.0)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(path)
    assert sorted(os.listdir(path)) == before
    assert not torch.any(FlashSloth.from_pretrained(path).mm_projector[2].bias == 42.0)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_a_full_disk_is_reported_before_writing(tmp_path, monkeypatch):
    import shutil

    path = str(tmp_path / "ckpt")
    model = tiny()
    model.save_pretrained(path)
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"needs \d+\.\d MiB for the weights, 0.0 MiB free"):
        model.save_pretrained(path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    FlashSloth.from_pretrained(path)


def test_save_into_a_file_path_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        tiny().save_pretrained(str(tmp_path / "f"))


# ---------------------------------------------------------------- exactly the named files
def test_a_stray_safetensors_file_is_ignored(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path))
    state = stored(str(tmp_path))
    save_file({"model.mm_projector.2.bias": torch.full_like(state["model.mm_projector.2.bias"],
                                                            42.0)},
              str(tmp_path / "zz-stray.safetensors"))
    loaded = FlashSloth.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.mm_projector[2].bias, model.mm_projector[2].bias)


def _sharded(tmp_path):
    tiny().save_pretrained(str(tmp_path), max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    return index


def _write_index(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_key_in_two_files_is_refused(tmp_path):
    index = _sharded(tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    first = load_file(str(tmp_path / shards[0]))
    second = load_file(str(tmp_path / shards[1]))
    key = next(iter(first))
    save_file({**second, key: first[key]}, str(tmp_path / shards[1]))
    with pytest.raises(CheckpointError, match=f"'{key}' is stored in two files"):
        FlashSloth.from_pretrained(str(tmp_path))


def test_shards_the_index_does_not_name_are_not_read(tmp_path):
    index = _sharded(tmp_path)
    key = next(iter(index["weight_map"]))
    save_file({key: torch.zeros(1)}, str(tmp_path / "model-99999-of-99999.safetensors"))
    FlashSloth.from_pretrained(str(tmp_path))            # the unnamed shard is never opened


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../x",
                                  "..\\x.safetensors", 7])
def test_shard_names_leaving_the_folder_are_refused(tmp_path, name):
    index = _sharded(tmp_path)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = name
    _write_index(tmp_path, index)
    with pytest.raises(CheckpointError, match="shard name"):
        FlashSloth.from_pretrained(str(tmp_path))


def test_a_symlinked_shard_leaving_the_folder_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    index = _sharded(ckpt)
    shard = sorted(set(index["weight_map"].values()))[0]
    os.rename(ckpt / shard, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", ckpt / shard)
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        FlashSloth.from_pretrained(str(ckpt))


def test_index_and_shards_must_agree(tmp_path):
    index = _sharded(tmp_path)
    wm = index["weight_map"]
    key = next(k for k in wm if list(wm.values()).count(wm[k]) > 1)   # its shard stays named
    other = next(n for n in sorted(set(wm.values())) if n != wm[key])
    index["weight_map"][key] = other
    _write_index(tmp_path, index)
    with pytest.raises(CheckpointError, match="which the index places in"):
        FlashSloth.from_pretrained(str(tmp_path))


def test_shards_without_an_index_are_refused(tmp_path):
    _sharded(tmp_path)
    os.remove(tmp_path / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        FlashSloth.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("content,message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"weight_map": []}', "weight_map"),
    (b"\xff\xfe\x00", "not valid JSON"),
])
def test_a_bad_index_names_the_file(tmp_path, content, message):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        FlashSloth.from_pretrained(str(tmp_path))
    assert "model.safetensors.index.json" in str(err.value) and message in str(err.value)


# ---------------------------------------------------------------- damaged files
def _damage(tmp_path, how):
    tiny().save_pretrained(str(tmp_path))
    file = tmp_path / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if how == "empty":
        file.write_bytes(b"")
    elif how == "truncated":
        file.write_bytes(raw[: len(raw) // 2])
    elif how == "truncated header":
        file.write_bytes(raw[:20])
    elif how == "short":
        file.write_bytes(raw[:5])
    elif how == "corrupt header":
        file.write_bytes(raw[:8] + b"\x00" * n + raw[8 + n:])
    elif how in ("bad offset", "overlap", "bad dtype"):
        key = sorted(k for k in header if k != "__metadata__")[1]
        if how == "bad offset":
            header[key]["data_offsets"][1] += 4
        elif how == "overlap":
            first = sorted(k for k in header if k != "__metadata__")[0]
            header[key]["data_offsets"] = header[first]["data_offsets"]
            header[key]["shape"] = header[first]["shape"]
        else:
            header[key]["dtype"] = "X99"
        new = json.dumps(header).encode()
        new += b" " * (-len(new) % 8)
        file.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    return str(tmp_path)


@pytest.mark.parametrize("how,message", [
    ("empty", "empty file"),
    ("short", "truncated"),
    ("truncated", "truncated"),
    ("truncated header", "truncated or corrupt header"),
    ("corrupt header", "corrupt header"),
    ("bad offset", "bad data offsets"),
    ("overlap", "overlap"),
    ("bad dtype", "corrupt header entry"),
])
def test_damaged_safetensors_files_name_the_file_and_the_fault(tmp_path, how, message):
    path = _damage(tmp_path, how)
    with pytest.raises(CheckpointError) as err:
        FlashSloth.from_pretrained(path)
    msg = str(err.value)
    assert "model.safetensors" in msg and message in msg, msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_or_bool_tensors_for_float_parameters_are_refused(tmp_path, dtype):
    tiny().save_pretrained(str(tmp_path))
    state = stored(str(tmp_path))
    key = "model.mm_projector.0.weight"
    state[key] = state[key].to(dtype)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"integer / bool / complex tensors for "
                                              f"floating-point parameters .*{key} in .*model"
                                              r"\.safetensors"):
        FlashSloth.from_pretrained(str(tmp_path))


def test_load_arguments_are_checked(tmp_path):
    tiny().save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="compression: expected one of"):
        FlashSloth.from_pretrained(str(tmp_path), compression="zip")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        FlashSloth.from_pretrained(str(tmp_path), dtype=torch.int8)


# ---------------------------------------------------------------- stop tokens
def test_stop_tokens_are_the_checkpoints_own(tmp_path):
    model = tiny()
    assert model.stop_token_ids == (2,)                       # the config's eos
    model.save_pretrained(str(tmp_path))
    assert FlashSloth.from_pretrained(str(tmp_path)).stop_token_ids == (2,)
    # the original release ships added_tokens.json with "</s>"; tokenizer.json may add it too
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<learnable>": 1000, "</s>": 1001}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert FlashSloth.from_pretrained(str(tmp_path)).stop_token_ids == (2, 7, 1001)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(CheckpointError, match="generation_config.json'?: eos_token_id"):
        FlashSloth.from_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="generation_config.json.*not valid JSON"):
        FlashSloth.from_pretrained(str(tmp_path))
