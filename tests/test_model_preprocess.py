"""Image preprocessing (as the original's HF image processor and HD tiling) and prompt handling."""

import numpy as np
import pytest
import torch
from PIL import Image

from flashsloth import FlashSlothConfig, Tokenizer, build_prompt, preprocess_images
from flashsloth.preprocess import SYSTEM_PROMPT, parse_token_ids, preprocess_image

CFG = FlashSlothConfig.preset("tiny")
HD = FlashSlothConfig.preset("tiny", hd=True)


def random_image(w=50, h=31, mode="RGB"):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode=mode)


def original_pipeline(pil, size):
    """The original's ImpImageProcessor steps, built from transformers' own transforms."""
    from transformers.image_transforms import (normalize, rescale, resize,
                                               to_channel_dimension_format)
    from transformers.image_utils import ChannelDimension, PILImageResampling

    arr = np.asarray(pil.convert("RGB"))
    arr = resize(arr, (size, size), resample=PILImageResampling.BICUBIC,
                 input_data_format=ChannelDimension.LAST)
    arr = rescale(arr, 1 / 255, input_data_format=ChannelDimension.LAST)
    arr = normalize(arr, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                    input_data_format=ChannelDimension.LAST)
    return torch.from_numpy(to_channel_dimension_format(arr, ChannelDimension.FIRST,
                                                        ChannelDimension.LAST))


def test_squash_matches_the_original_processor():
    pytest.importorskip("transformers")
    img = random_image()
    got = preprocess_image(img, CFG)
    assert got.shape == (3, 84, 84) and got.dtype == torch.float32
    torch.testing.assert_close(got, original_pipeline(img, 84), rtol=0, atol=1e-6)


def test_hd_views_match_the_original_tiling():
    pytest.importorskip("transformers")
    img = random_image(60, 37)
    got = preprocess_image(img, HD)
    assert got.shape == (5, 3, 84, 84)
    # original: expand2square with (127, 127, 127), resize to 168, 2 x 2 crops, global view first
    side = 60
    square = Image.new("RGB", (side, side), (127, 127, 127))
    square.paste(img, (0, (side - 37) // 2))
    big = square.resize((168, 168))
    tiles = [big.crop((x, y, x + 84, y + 84)) for y in (0, 84) for x in (0, 84)]
    views = [img.resize((84, 84))] + tiles
    for i, view in enumerate(views):
        torch.testing.assert_close(got[i], original_pipeline(view, 84), rtol=0, atol=1e-6,
                                   msg=f"view {i}")
    torch.testing.assert_close(got[0], preprocess_image(img, CFG))


def test_uint8_tensors_match_pil_in_either_layout():
    img = random_image()
    hwc = torch.from_numpy(np.asarray(img).copy())
    ref = preprocess_image(img, CFG)
    torch.testing.assert_close(preprocess_image(hwc, CFG), ref)
    torch.testing.assert_close(preprocess_image(hwc.permute(2, 0, 1), CFG), ref)
    torch.testing.assert_close(preprocess_image(np.asarray(img), CFG), ref)
    batch = preprocess_images(torch.stack([hwc, hwc]), CFG)
    assert batch.shape == (2, 3, 84, 84)
    torch.testing.assert_close(batch[1], ref)


def test_grey_and_rgba_become_rgb():
    grey = torch.randint(0, 256, (20, 30), dtype=torch.uint8)
    out = preprocess_image(grey, CFG)
    assert out.shape == (3, 84, 84)
    torch.testing.assert_close(out[0], out[1])
    rgba = random_image(mode="RGBA")
    torch.testing.assert_close(preprocess_image(rgba, CFG),
                               preprocess_image(rgba.convert("RGB"), CFG))


def test_bad_images_are_clear_errors():
    with pytest.raises(ValueError, match="channels"):
        preprocess_image(torch.zeros(20, 30, 2, dtype=torch.uint8), CFG)
    with pytest.raises(TypeError, match="uint8"):
        preprocess_image(torch.rand(3, 20, 30), CFG)
    with pytest.raises(ValueError, match="empty"):
        preprocess_image(torch.zeros(0, 30, 3, dtype=torch.uint8), CFG)
    with pytest.raises(ValueError, match="shape"):
        preprocess_image(torch.zeros(2, 3, 20, 30, dtype=torch.uint8), CFG)
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_image("image.png", CFG)
    with pytest.raises(ValueError, match="empty list"):
        preprocess_images([], CFG)


def test_prompt_template():
    assert build_prompt("What is it?") == (
        SYSTEM_PROMPT + " USER: <image>\nWhat is it?<learnable> ASSISTANT:")
    assert build_prompt("<image>\nQ<learnable>") == (
        SYSTEM_PROMPT + " USER: <image>\nQ<learnable> ASSISTANT:")
    assert "<learnable>" not in build_prompt("Q", with_slot=False)


def test_token_id_prompts():
    cfg = CFG
    assert parse_token_ids("<image> 5, 6 7<learnable>9", cfg) == [
        cfg.image_token_id, 5, 6, 7, cfg.query_token_id, 9]
    with pytest.raises(ValueError, match="not a token id"):
        parse_token_ids("<image> five", cfg)


def make_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<unk>", "<|endoftext|>", "a", "b", "USER", ":", "ASSISTANT", "What", "is", "it", "?"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<learnable>"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_maps_markers_to_config_ids(tmp_path):
    path = make_tokenizer(tmp_path)
    tok = Tokenizer(str(tmp_path))                      # a directory holding tokenizer.json
    ids = tok.encode_prompt("USER: <image>\nWhat is it?<learnable> ASSISTANT:", CFG)
    assert ids == [4, 5, CFG.image_token_id, 7, 8, 9, 10, CFG.query_token_id, 6, 5]
    assert tok.decode([7, 8, 9]) == "What is it"
    assert Tokenizer(str(path)).token_to_id("<|endoftext|>") == 1
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(str(tmp_path / "missing"))
