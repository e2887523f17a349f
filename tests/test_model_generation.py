"""Generation as the original release: stopping on the checkpoint's own end tokens, the
question each query slot sees in multi-turn prompts (checked against a re-implementation of
the original's rule), sampling at tiny temperatures, and image_aspect_ratio "pad"."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flashsloth import FlashSloth, FlashSlothConfig
from flashsloth.config import IGNORE_INDEX
from flashsloth.model import _next_token
from flashsloth.preprocess import preprocess_image


def tiny(**overrides) -> FlashSloth:
    torch.manual_seed(0)
    return FlashSloth(FlashSlothConfig.preset("tiny", **overrides)).eval()


def prompt(cfg):
    return torch.tensor([[5, cfg.image_token_id, 3, 7, 8, cfg.query_token_id, 9]])


def pixels(cfg):
    torch.manual_seed(1)
    S = cfg.vision.image_size
    return torch.randn(1, 3, S, S)


# ---------------------------------------------------------------- stop tokens
def test_generation_stops_on_any_of_the_stop_tokens():
    model = tiny()
    cfg = model.config
    free = model.generate(pixels(cfg), prompt(cfg), max_new_tokens=8, eos_token_id=None)[0]
    assert free.numel() == 8
    k = 3
    stop = int(free[k])
    first = int((free == stop).nonzero()[0])          # the first time that token comes
    out = model.generate(pixels(cfg), prompt(cfg), max_new_tokens=8,
                         eos_token_id=[12345, stop])[0]
    assert torch.equal(out, free[:first + 1])
    # -1 (the default) means the model's stop_token_ids, as from_pretrained sets them
    model.stop_token_ids = (stop,)
    assert torch.equal(model.generate(pixels(cfg), prompt(cfg), max_new_tokens=8)[0],
                       free[:first + 1])
    model.stop_token_ids = ()
    assert model.generate(pixels(cfg), prompt(cfg), max_new_tokens=8)[0].numel() == 8
    with pytest.raises(TypeError, match="eos_token_id"):
        model.generate(pixels(cfg), prompt(cfg), eos_token_id="</s>")


def test_from_pretrained_stops_on_the_fine_tunes_end_token(tmp_path):
    model = tiny()
    cfg = model.config
    free = model.generate(pixels(cfg), prompt(cfg), max_new_tokens=8, eos_token_id=None)[0]
    stop = int(free[2])
    first = int((free == stop).nonzero()[0])
    model.save_pretrained(str(tmp_path))
    # the released fine-tune's tokenizer holds an added "</s>" (its answers end with it)
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": [{"id": stop, "content": "</s>", "special": True}],
         "model": {"vocab": {}}}))
    loaded = FlashSloth.from_pretrained(str(tmp_path))
    assert stop in loaded.stop_token_ids
    out = loaded.generate(pixels(cfg), prompt(cfg), max_new_tokens=8)[0]
    assert torch.equal(out, free[:first + 1])


# ---------------------------------------------------------------- multi-turn question spans
def original_question_ranges(labels, slot_starts, prefix_len, image_len):
    """The original's extract_question_token_indices ("phi2"), for one sample of the expanded
    sequence: the first question from after the image (+1: the newline) to the first slot; a
    later one from 2 tokens past the end of each labelled answer to the next slot; slots left
    over get the last range."""
    ranges = [(prefix_len + image_len + 1, slot_starts[0])]
    counter = 1
    for i in range(len(labels) - 1):
        if labels[i] != IGNORE_INDEX and labels[i + 1] == IGNORE_INDEX:
            if counter >= len(slot_starts):
                break
            ranges.append((i + 3, slot_starts[counter]))
            counter += 1
    ranges = ranges[:len(slot_starts)]
    while len(ranges) < len(slot_starts):
        ranges.append(ranges[-1])
    return ranges


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("turns", [2, 3])
def test_multi_turn_question_spans_match_the_original(labelled, turns):
    model = tiny()
    cfg = model.config
    img, slot = cfg.image_token_id, cfg.query_token_id
    prefix = [5, 6, 4]
    ids = prefix + [img, 3, 7, 8, 9, slot]
    answers = []
    for t in range(1, turns):
        ids += [20, 21]                               # " ASSISTANT:"
        answers += list(range(len(ids), len(ids) + 2 + t))
        ids += [30 + t] * (2 + t)                      # the answer
        ids += [40, 41] + [50 + t] * (t + 1) + [slot]  # "USER:" + the next question
    ids += [20, 21, 60]
    labels = [IGNORE_INDEX] * len(ids)
    if labelled:
        for i in answers:
            labels[i] = ids[i]
    layout = model.build_layout(torch.tensor([ids]),
                                labels=torch.tensor([labels]) if labelled else None)
    M, Q = cfg.num_image_tokens, cfg.num_queries
    starts = layout.slot_starts.tolist()
    exp_labels = (layout.labels[0].tolist() if labelled
                  else [IGNORE_INDEX] * layout.length)   # the original fills -100 at inference
    want = original_question_ranges(exp_labels, starts, len(prefix), M)
    got = []
    for i in range(len(starts)):
        pos = layout.question_index[i][layout.question_mask[i]].tolist()
        assert pos == list(range(pos[0], pos[-1] + 1))      # contiguous
        got.append((pos[0], pos[-1] + 1))
    assert got == want
    assert len(starts) == turns and Q == 9


# ---------------------------------------------------------------- sampling
def test_tiny_temperatures_sample_the_argmax_without_nan():
    logits = torch.randn(4, 1000) * 10
    gen = torch.Generator().manual_seed(0)
    for t in (1e-45, 1e-30, 1e-8):
        out = _next_token(logits, True, t, None, None, gen)
        assert torch.equal(out, logits.argmax(-1))
    out = _next_token(logits, True, 1e-45, 5, 0.5, gen)
    assert torch.equal(out, logits.argmax(-1))


# ---------------------------------------------------------------- image_aspect_ratio "pad"
def expand2square(array, colour):
    """The original's expand2square on an (H, W, 3) uint8 array."""
    h, w, _ = array.shape
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = colour
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = array
    return out


@pytest.mark.parametrize("shape", [(40, 64, 3), (64, 40, 3), (41, 64, 3), (50, 50, 3)])
def test_pad_aspect_ratio_pads_with_the_mean_colour_first(shape):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    cfg = FlashSlothConfig.preset("tiny", image_aspect_ratio="pad")
    S = cfg.vision.image_size
    padded = Image.fromarray(expand2square(array, (127, 127, 127))).resize(
        (S, S), Image.Resampling.BICUBIC)
    want = (np.asarray(padded, np.float64) / 255 - 0.5) / 0.5
    got = preprocess_image(Image.fromarray(array), cfg).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    squashed = preprocess_image(Image.fromarray(array), cfg.replace(image_aspect_ratio="squash"))
    assert torch.equal(squashed, preprocess_image(array, FlashSlothConfig.preset("tiny")))
    if shape[0] != shape[1]:
        assert not np.allclose(squashed.permute(1, 2, 0).numpy(), want)


def test_pad_in_an_original_config_json_is_honoured(tmp_path):
    # sizes an original config.json can describe (see test_model_checkpoint)
    model = tiny(vision={"hidden_size": 144, "num_attention_heads": 2, "intermediate_size": 96},
                 text={"num_hidden_layers": 8}, embq_layer=8, query_token_id=50295)
    model.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["image_aspect_ratio"] == "square"
    del data["flashsloth_kernels"]
    data["image_aspect_ratio"] = "pad"
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = FlashSloth.from_pretrained(str(tmp_path))
    assert loaded.config.image_aspect_ratio == "pad"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8))
    assert torch.equal(loaded.pixel_values([image])[0], preprocess_image(image, loaded.config))
    assert not torch.equal(loaded.pixel_values([image]), model.pixel_values([image]))
    # and it survives a save in this package's layout
    loaded.save_pretrained(str(tmp_path / "again"))
    assert FlashSloth.from_pretrained(str(tmp_path / "again")).config.image_aspect_ratio == "pad"
