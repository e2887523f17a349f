"""FlashSlothConfig validation (every field: type and range, with a ValueError naming the
field, the value and what is allowed), for direct construction, presets with overrides,
config.json in both layouts; and FlashSloth(config, device=None) following torch's default
device."""

import json

import pytest
import torch

from flashsloth import COMPRESSIONS, CheckpointError, FlashSloth, FlashSlothConfig
from flashsloth.config import _GLUE_FIELDS, _TEXT_FIELDS, _VISION_FIELDS


@pytest.mark.parametrize("overrides,field,allowed", [
    ({"text": {"num_attention_heads": 0}}, "text.num_attention_heads", "an int >= 1"),
    ({"vision": {"num_attention_heads": 0}}, "vision.num_attention_heads", "an int >= 1"),
    ({"text": {"hidden_size": "64"}}, "text.hidden_size", "an int >= 1"),
    ({"text": {"hidden_size": -64}}, "text.hidden_size", "an int >= 1"),
    ({"vision": {"hidden_size": 48.0}}, "vision.hidden_size", "an int"),
    ({"sap_window": 3.0}, "sap_window", "an int >= 1"),
    ({"sap_window": True}, "sap_window", "an int"),
    ({"sap_window": 7}, "sap_window", "1..6"),
    ({"num_queries": 0}, "num_queries", ">= 1"),
    ({"hd": "yes"}, "hd", "true or false"),
    ({"compression": "zip"}, "compression", "flashsloth"),
    ({"compression": 3}, "compression", "a string"),
    ({"text": {"layer_norm_eps": float("nan")}}, "text.layer_norm_eps", "a finite number"),
    ({"text": {"layer_norm_eps": 0}}, "text.layer_norm_eps", "> 0"),
    ({"text": {"resid_pdrop": 1.5}}, "text.resid_pdrop", "[0, 1]"),
    ({"text": {"partial_rotary_factor": 0}}, "text.partial_rotary_factor", "(0, 1]"),
    ({"text": {"eos_token_id": 5000}}, "text.eos_token_id", "outside the vocabulary"),
    ({"text": {"eos_token_id": "2"}}, "text.eos_token_id", "or null"),
    ({"query_offset_token_id": -1}, "query_offset_token_id", ">= 0 or null"),
    ({"question_skip_after_image": -1}, "question_skip_after_image", ">= 0"),
    ({"image_mean": [0.5, 0.5]}, "image_mean", "3 (vision.num_channels)"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std", "> 0"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio", "squash, pad"),
    ({"vision": [1, 2]}, "vision", "dict"),
    ({"text": {"bogus": 1}}, "text", "unknown fields ['bogus']"),
    ({"embq_layer": 9}, "embq_layer", "1..4"),
    ({"vision": {"select_layer": -9}}, "vision.select_layer", "selects no layer"),
])
def test_preset_overrides_are_validated(overrides, field, allowed):
    with pytest.raises(ValueError) as err:
        FlashSlothConfig.preset("tiny", **overrides)
    msg = str(err.value)
    assert msg.startswith(field) and allowed in msg, msg


def test_messages_name_the_value_and_its_type():
    with pytest.raises(ValueError, match=r"text.hidden_size: expected an int >= 1, got '64' "
                                         r"\(str\)"):
        FlashSlothConfig.preset("tiny", text={"hidden_size": "64"})
    with pytest.raises(ValueError, match=r"sap_window: expected an int >= 1, got 3.0"):
        FlashSlothConfig.preset("tiny", sap_window=3.0)


def test_every_field_has_a_check():
    import dataclasses

    from flashsloth.config import TextConfig, VisionConfig
    assert set(_VISION_FIELDS) == {f.name for f in dataclasses.fields(VisionConfig)}
    assert set(_TEXT_FIELDS) == {f.name for f in dataclasses.fields(TextConfig)}
    glue = {f.name for f in dataclasses.fields(FlashSlothConfig)} - {"vision", "text",
                                                                     "image_mean", "image_std"}
    assert set(_GLUE_FIELDS) == glue


def test_compression_checked_against_the_one_tuple():
    for mode in COMPRESSIONS:
        assert FlashSlothConfig.preset("tiny", compression=mode).compression == mode
    with pytest.raises(ValueError, match=", ".join(COMPRESSIONS)):
        FlashSlothConfig.preset("tiny", compression="bogus")
    with pytest.raises(ValueError, match="compression"):
        FlashSlothConfig.preset("tiny").replace(compression="bogus")


def test_bad_preset_names_and_direct_construction():
    with pytest.raises(ValueError, match="preset: expected one of"):
        FlashSlothConfig.preset(["tiny"])
    with pytest.raises(ValueError, match="unknown field 'nope'"):
        FlashSlothConfig.preset("tiny", nope=1)
    with pytest.raises(ValueError, match="FlashSlothConfig: expected a dict"):
        FlashSlothConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="text.num_attention_heads"):
        FlashSlothConfig(text={"num_attention_heads": 0})


def _checkpoint(tmp_path, edit, block=True):
    torch.manual_seed(0)
    FlashSloth(FlashSlothConfig.preset("tiny")).save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "config.json").read_text())
    if not block:
        del data["flashsloth_kernels"]
    data = edit(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
    return str(tmp_path)


def _set(path, value):
    def edit(data):
        d = data
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return data
    return edit


@pytest.mark.parametrize("edit,block,message", [
    (_set(["flashsloth_kernels", "text", "num_attention_heads"], 0), True,
     "text.num_attention_heads: expected an int >= 1, got 0"),
    (_set(["flashsloth_kernels", "text", "hidden_size"], "64"), True,
     "text.hidden_size: expected an int >= 1, got '64' (str)"),
    (_set(["flashsloth_kernels", "text", "hidden_size"], -64), True,
     "text.hidden_size: expected an int >= 1, got -64"),
    (_set(["flashsloth_kernels", "sap_window"], 3.0), True, "sap_window: expected an int"),
    (_set(["torch_dtype"], "float8_e4m3fn"), True, "torch_dtype: expected one of float32"),
    (_set(["torch_dtype"], "int64"), True, "torch_dtype"),
    (_set(["flashsloth_kernels"], [1]), True, "flashsloth_kernels: expected a JSON object"),
    (lambda d: [d], True, "expected a JSON object, got a list"),
    (_set(["num_attention_heads"], 0), False, "num_attention_heads: expected an int >= 1, got 0"),
    (_set(["hidden_size"], "64"), False, "hidden_size: expected an int >= 1, got '64' (str)"),
    (_set(["num_hidden_layers"], -4), False, "num_hidden_layers: expected an int >= 1"),
    (_set(["layer_norm_eps"], "1e-5"), False, "layer_norm_eps: expected a finite number"),
    (_set(["image_hd"], "no"), False, "image_hd: expected true or false"),
    (_set(["image_aspect_ratio"], "anyres"), False, "image_aspect_ratio"),
    (_set(["mm_vision_select_layer"], "-2"), False, "mm_vision_select_layer: expected an int"),
])
def test_config_json_is_validated(tmp_path, edit, block, message):
    path = _checkpoint(tmp_path, edit, block)
    with pytest.raises(CheckpointError) as err:
        FlashSloth.from_pretrained(path)
    msg = str(err.value)
    assert "config.json" in msg and message in msg, msg
    assert isinstance(err.value, ValueError)


def test_model_dtype_is_checked():
    cfg = FlashSlothConfig.preset("tiny")
    with pytest.raises(ValueError, match="dtype: expected one of float32"):
        FlashSloth(cfg, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="dtype"):
        FlashSloth(cfg, dtype=torch.int64)
    with pytest.raises(TypeError, match="config: expected a FlashSlothConfig"):
        FlashSloth({"compression": "sap"})


def test_device_none_follows_torchs_default_device():
    cfg = FlashSlothConfig.preset("tiny")
    with torch.device("meta"):
        model = FlashSloth(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert FlashSloth(cfg).device.type == "cpu"
    torch.set_default_device("meta")
    try:
        model = FlashSloth(cfg)
    finally:
        torch.set_default_device(None)
    assert all(p.is_meta for p in model.parameters())
    # an explicit device wins over the context, as for nn.Module constructors
    with torch.device("meta"):
        model = FlashSloth(cfg, device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    # the 3.2B preset inside a meta block: no memory, sizes only
    with torch.device("meta"):
        big = FlashSloth(FlashSlothConfig.preset("flashsloth-3.2b"))
    assert big.num_parameters() > 3e9 and next(big.parameters()).is_meta
