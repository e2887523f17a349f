"""Training data: the JSONL format, tokenisation into labelled sequences, bad lines, the
synthetic grounding generator."""

import json
import os

import numpy as np
import pytest
import torch

from flashsloth import FlashSlothConfig
from flashsloth.config import IGNORE_INDEX
from flashsloth.data import (ConversationDataset, ConversationEncoder, DataError, ShardedSampler,
                             collate, expanded_length, read_examples)
from flashsloth.preprocess import Tokenizer
from flashsloth.synthetic import COLOURS, SHAPES, GroundingSpec, generate, vocabulary


@pytest.fixture(scope="module")
def grounding(tmp_path_factory):
    out = tmp_path_factory.mktemp("grounding")
    generate(str(out), GroundingSpec(train=6, test=2, turns=2, seed=3))
    return str(out)


@pytest.fixture(scope="module")
def tok(grounding):
    return Tokenizer(grounding)


def _cfg(**kw):
    return FlashSlothConfig.preset("tiny", **kw)


def test_encoder_labels_answers_only_and_marks_questions(tok):
    cfg = _cfg()
    enc = ConversationEncoder(tok, cfg, system="")
    ids, labels, qmask = enc.encode([("what shape is at a1 ?", "circle"),
                                     ("what colour is the shape at b2 ?", "red")])
    words = {w: i for i, w in enumerate(vocabulary(6))}
    eos = cfg.text.eos_token_id
    # answers and their EOS are the only labelled tokens
    assert [t for t in labels if t != IGNORE_INDEX] == [words["circle"], eos, words["red"], eos]
    assert [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX] == \
        [t for t in labels if t != IGNORE_INDEX]
    # one image marker first, one slot per turn right after each question
    assert ids.count(cfg.image_token_id) == 1 and ids.count(cfg.query_token_id) == 2
    assert ids[ids.index(cfg.image_token_id) + 1] == words["\n"]
    q1 = [t for t, m in zip(ids, qmask) if m]
    assert q1 == (tok.encode("what shape is at a1 ?")
                  + tok.encode("what colour is the shape at b2 ?"))
    for slot in [i for i, t in enumerate(ids) if t == cfg.query_token_id]:
        assert qmask[slot - 1] and not qmask[slot]
    # the default system prompt is the original's
    ids_sys, _, _ = ConversationEncoder(tok, cfg).encode([("what shape is at a1 ?", "circle")])
    assert len(ids_sys) > len(enc.encode([("what shape is at a1 ?", "circle")])[0])


def test_expanded_length_counts_visual_and_query_tokens(tok):
    for comp, per_turn in (("flashsloth", 9), ("sap", 0), ("avgpool", 0)):
        cfg = _cfg(compression=comp)
        enc = ConversationEncoder(tok, cfg, system="")
        ids, _, _ = enc.encode([("what shape is at a1 ?", "x")] * 2)
        # marker -> 4 visual tokens (6 x 6 patches, 3 x 3 windows); slot -> 9 queries or nothing
        assert expanded_length(len(ids), 2, cfg) == len(ids) - 1 + 4 + 2 * (per_turn - 1)


def test_dataset_items_and_collate(grounding, tok):
    cfg = _cfg()
    ds = ConversationDataset(os.path.join(grounding, "train.jsonl"), tok, cfg, system="")
    assert len(ds) == 6 and ds.issues == []
    item = ds[0]
    assert item["pixel_values"].shape == (3, 84, 84) and item["line"] == 1
    batch = collate([ds[0], ds[1], ds[2]], pad_token_id=0)
    B, T = batch["input_ids"].shape
    assert B == 3 and batch["images"].shape == (3, 3, 84, 84)
    assert batch["attention_mask"].dtype == torch.bool
    assert ((batch["labels"] != IGNORE_INDEX) <= batch["attention_mask"]).all()
    assert ((batch["question_mask"]) <= batch["attention_mask"]).all()
    assert batch["lines"] == [1, 2, 3]


def _write(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_bad_lines_reported_with_line_numbers(grounding, tok, tmp_path, capsys):
    cfg = _cfg()
    img = os.path.join(grounding, "images", "train_000000.png")
    good = {"image": img,
            "conversations": [{"from": "human", "value": "<image>\nwhat shape is at a1 ?"},
                              {"from": "gpt", "value": "circle"}]}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = [
        good,                                                                    # 1 ok
        "{not json",                                                             # 2
        {**good, "image": str(tmp_path / "nowhere.png")},                        # 3 missing image
        {"image": img, "conversations": [{"from": "human", "value": "what ?"}]},  # 4 no answer
        {"image": img, "conversations": [{"from": "human", "value": "a1 " * 600},
                                         {"from": "gpt", "value": "red"}]},       # 5 too long
        "",                                                                      # 6 blank: ignored
        {**good, "image": str(broken)},                                          # 7 unreadable
        {"conversations": good["conversations"]},                                # 8 no image key
        {"image": img, "conversations": [{"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "  "}]},        # 9 empty answer
        good,                                                                    # 10 ok
    ]
    path = tmp_path / "data.jsonl"
    _write(path, rows)
    examples, issues = read_examples(str(path), ConversationEncoder(tok, cfg, system=""))
    assert [e.line for e in examples] == [1, 10]
    by_line = {i.line: i.reason for i in issues}
    assert sorted(by_line) == [2, 3, 4, 5, 7, 8, 9]
    assert "not valid JSON" in by_line[2]
    assert "missing image" in by_line[3] and "nowhere.png" in by_line[3]
    assert "no answer" in by_line[4] and "no answer" in by_line[9]
    assert "too long" in by_line[5] and "limit is 512" in by_line[5]
    assert "unreadable image" in by_line[7]
    assert "no \"image\"" in by_line[8]
    # skip: every bad line is reported, with file and line number
    ds = ConversationDataset(str(path), tok, cfg, system="")
    assert len(ds) == 2
    err = capsys.readouterr().err
    for n in (2, 3, 4, 5, 7, 8, 9):
        assert f"data.jsonl:{n}:" in err
    # error: one exception listing them all
    with pytest.raises(DataError) as exc:
        ConversationDataset(str(path), tok, cfg, system="", on_bad="error")
    assert len(exc.value.issues) == 7 and "data.jsonl:5: too long" in str(exc.value)


def test_all_bad_lines_is_an_error(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    _write(path, ["[1, 2]"])
    with pytest.raises(ValueError, match="no usable line"):
        ConversationDataset(str(path), tok, _cfg(), system="", report=lambda issue: None)


def test_sharded_sampler_splits_and_resumes():
    s0 = ShardedSampler(10, world_size=2, rank=0, seed=5)
    s1 = ShardedSampler(10, world_size=2, rank=1, seed=5)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 5 and sorted(a + b) == list(range(10))
    s0.set_epoch(1)
    assert list(s0) != a                       # a new order each epoch
    s0.set_epoch(1, start=3)
    full = ShardedSampler(10, world_size=2, rank=0, seed=5)
    full.set_epoch(1)
    assert list(s0) == list(full)[3:] and len(s0) == 2
    odd = ShardedSampler(5, world_size=2, rank=1)
    assert len(list(odd)) == 3                 # padded by wrapping: equal shares


def test_synthetic_is_reproducible_and_answers_match_pixels(tmp_path):
    spec = GroundingSpec(train=5, test=0, turns=3, seed=11)
    a, b = tmp_path / "a", tmp_path / "b"
    generate(str(a), spec)
    generate(str(b), spec)
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()
    assert (a / "images" / "train_000004.png").read_bytes() == \
        (b / "images" / "train_000004.png").read_bytes()
    from PIL import Image

    tok = Tokenizer(str(a))
    unk = tok.token_to_id("<unk>")
    for line in (a / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        pixels = np.asarray(Image.open(a / rec["image"]).convert("RGB"))
        assert pixels.shape == (84, 84, 3)
        for (row, col), kind, turn in zip(rec["cell"], rec["kind"], range(0, 99, 2)):
            q, ans = rec["conversations"][turn]["value"], rec["conversations"][turn + 1]["value"]
            assert unk not in tok.encode(q.replace("<image>", "")) and unk not in tok.encode(ans)
            cell = pixels[(row - 1) * 14:row * 14, (col - 1) * 14:col * 14].reshape(-1, 3)
            lit = cell[cell.sum(1) > 0]
            if kind == "colour":
                assert ans in COLOURS
                assert (lit == np.array(COLOURS[ans])).all(1).all()
            else:
                assert ans in SHAPES


def test_synthetic_sparse_training_boards_keep_the_asked_cell(tmp_path):
    generate(str(tmp_path), GroundingSpec(train=20, test=5, turns=2, min_fill=0.0, seed=4))
    from PIL import Image

    empty_cells = {"train": 0, "test": 0}
    for split in ("train", "test"):
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            px = np.asarray(Image.open(tmp_path / rec["image"]).convert("RGB"))
            cells = px.reshape(6, 14, 6, 14, 3).sum(axis=(1, 3, 4))
            empty_cells[split] += int((cells == 0).sum())
            for row, col in rec["cell"]:
                assert cells[row - 1, col - 1] > 0          # an asked cell always has a glyph
    assert empty_cells["train"] > 0 and empty_cells["test"] == 0   # held-out boards are full
    with pytest.raises(ValueError, match="min_fill"):
        GroundingSpec(min_fill=1.5).validate()


def test_synthetic_test_turns_sets_the_held_out_questions_per_board(tmp_path):
    generate(str(tmp_path / "a"), GroundingSpec(train=4, test=3, turns=4, test_turns=1, seed=2))
    for split, turns in (("train", 4), ("test", 1)):
        for line in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert len(rec["cell"]) == turns and len(rec["conversations"]) == 2 * turns
    # None (the default) keeps the old behaviour: the held-out boards get `turns` questions,
    # and the files are byte for byte those of a spec without the field
    generate(str(tmp_path / "b"), GroundingSpec(train=2, test=2, turns=2, seed=2))
    generate(str(tmp_path / "c"), GroundingSpec(train=2, test=2, turns=2, test_turns=None,
                                                seed=2))
    for split in ("train", "test"):
        assert (tmp_path / "b" / f"{split}.jsonl").read_text() == \
            (tmp_path / "c" / f"{split}.jsonl").read_text()
    assert all(len(json.loads(x)["cell"]) == 2
               for x in (tmp_path / "b" / "test.jsonl").read_text().splitlines())
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="test_turns"):
            GroundingSpec(test_turns=bad).validate()


def test_synthetic_cli_and_bad_arguments(tmp_path, capsys):
    from flashsloth.synthetic import main

    assert main(["--out", str(tmp_path / "d"), "--train", "2", "--test", "1"]) == 0
    assert (tmp_path / "d" / "tokenizer.json").is_file()
    assert main(["--out", str(tmp_path / "e"), "--kinds", "size"]) == 2
    assert "kinds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="grid"):
        GroundingSpec(grid=0).validate()


# ---------------------------------------------------------------------------- bad input lines
def _lines(grounding):
    return open(os.path.join(grounding, "train.jsonl"), "rb").read().splitlines()


def _write_raw(tmp_path, grounding, rows: list) -> str:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    if not (tmp_path / "images").exists():
        import shutil

        shutil.copytree(os.path.join(grounding, "images"), tmp_path / "images")
    return str(path)


def test_non_utf8_bom_and_deep_nesting_are_each_their_own_line_only(grounding, tok, tmp_path):
    rows = _lines(grounding)
    bad_utf8 = rows[1].replace(b"what", b"wh\xffat", 1)
    deep = b"[" * 100_000 + b"]" * 100_000
    path = _write_raw(tmp_path, grounding, [b"\xef\xbb\xbf" + rows[0], bad_utf8, deep, *rows[2:]])
    examples, issues = read_examples(path, ConversationEncoder(tok, _cfg(), system=""))
    assert [e.line for e in examples] == [1, 4, 5, 6, 7]        # the BOM line is fine
    assert [(i.line, i.reason.split(" (")[0]) for i in issues] == [
        (2, "not UTF-8"), (3, "JSON nested too deeply to parse")]
    assert "byte 0xff" in issues[0].reason
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8"):
        ConversationDataset(path, tok, _cfg(), system="", on_bad="error")


def _broken_images(folder):
    """A truncated JPEG and a PNG with corrupt IDAT data but valid CRCs: both pass PIL's
    verify() and fail to decode."""
    import io
    import struct
    import zlib

    from PIL import Image

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 84, 3), np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    jpg = buf.getvalue()
    (folder / "trunc.jpg").write_bytes(jpg[:len(jpg) // 2])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    png = bytearray(buf.getvalue())
    pos = 8
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos:pos + 4])
        if png[pos + 4:pos + 8] == b"IDAT":
            data = bytearray(png[pos + 8:pos + 8 + n])
            for k in range(n // 2, n // 2 + 64):
                data[k] ^= 0xFF
            png[pos + 8:pos + 8 + n] = data
            png[pos + 8 + n:pos + 12 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + data))
            break
        pos += 12 + n
    (folder / "idat.png").write_bytes(bytes(png))
    for name in ("trunc.jpg", "idat.png"):
        with Image.open(folder / name) as f:
            f.verify()                                           # passes
    return ["images/trunc.jpg", "images/idat.png"]


def _with_images(rows, names):
    out = list(rows)
    for k, name in zip((1, 3), names):
        rec = json.loads(out[k])
        rec["image"] = name
        out[k] = json.dumps(rec).encode()
    return out


def test_images_that_fail_to_decode_are_found_at_validation_with_decode(grounding, tok,
                                                                        tmp_path):
    rows = _lines(grounding)
    path = _write_raw(tmp_path, grounding, rows)
    names = _broken_images(tmp_path / "images")
    path = _write_raw(tmp_path, grounding, _with_images(rows, names))
    enc = ConversationEncoder(tok, _cfg(), system="")
    _, header_issues = read_examples(path, enc)                  # verify() passes them
    assert header_issues == []
    _, issues = read_examples(path, enc, check_images="decode")
    assert [(i.line, i.reason.split(":")[0]) for i in issues] == [(2, "unreadable image"),
                                                                  (4, "unreadable image")]


def test_images_that_fail_to_decode_at_load_time_are_blank_unlabelled_items(grounding, tok,
                                                                           tmp_path):
    rows = _lines(grounding)
    path = _write_raw(tmp_path, grounding, rows)
    path = _write_raw(tmp_path, grounding, _with_images(rows, _broken_images(tmp_path / "images")))
    ds = ConversationDataset(path, tok, _cfg(), system="")
    assert len(ds) == 6 and ds[0]["issue"] is None
    bad = ds[1]
    assert str(bad["issue"]).startswith(f"{path}:2: undecodable image: ")
    assert (bad["labels"] == IGNORE_INDEX).all() and not bad["pixel_values"].any()
    batch = collate([ds[0], ds[1], ds[3]])
    assert [i.line for i in batch["issues"]] == [2, 4]
    assert batch["images"].shape[0] == 3                         # shapes unchanged
