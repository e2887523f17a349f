"""The command line `python -m flashsloth.generate`: presets, checkpoints, tokenizers and clear
messages (no traceback) for bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flashsloth import FlashSloth, FlashSlothConfig
from flashsloth.generate import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def tokenizer_file(tmp_path):
    """A word-level tokenizer covering the tiny preset's 1024 ids; id 2 is <|endoftext|>."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<unk>", "<pad>", "<|endoftext|>", "USER", ":", "ASSISTANT", "What", "is", "this", "?"]
    words += [f"w{i}" for i in range(1024 - len(words))]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<learnable>"])
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return str(path)


def run_cli(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out.strip(), err.strip()


def test_preset_with_token_ids(capsys, image):
    rc, out, err = run_cli(capsys, "--image", image, "--prompt", "<image> 5 6 7 <learnable> 9",
                           "--preset", "tiny", "--max-new-tokens", "5")
    assert rc == 0, err
    ids = [int(t) for t in out.split()]
    assert 1 <= len(ids) <= 5 and all(0 <= t < 1024 for t in ids)


def test_sampling_is_seeded(capsys, image):
    args = ["--image", image, "--prompt", "5 6 <learnable>", "--temperature", "0.9",
            "--top-p", "0.8", "--seed", "4", "--max-new-tokens", "6"]
    first = run_cli(capsys, *args)
    second = run_cli(capsys, *args)
    assert first[0] == 0 and first == second


def test_tokenizer_and_template(capsys, image, tokenizer_file):
    rc, out, err = run_cli(capsys, "--image", image, "--prompt", "What is this?",
                           "--tokenizer", tokenizer_file, "--system", "w1 w2",
                           "--max-new-tokens", "4")
    assert rc == 0, err
    assert all(w.startswith("w") or w in ("USER", ":", "ASSISTANT", "What", "is", "this", "?")
               for w in out.split())


def test_checkpoint_directory_with_its_tokenizer(capsys, image, tokenizer_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    FlashSloth(FlashSlothConfig.preset("tiny")).save_pretrained(str(ckpt))
    shutil.copy(tokenizer_file, ckpt / "tokenizer.json")
    rc, out, err = run_cli(capsys, "--image", image, "--prompt", "What is this?",
                           "--checkpoint", str(ckpt), "--max-new-tokens", "3")
    assert rc == 0, err
    rc2, out2, _ = run_cli(capsys, "--image", image, "--prompt", "What is this?",
                           "--checkpoint", str(ckpt), "--max-new-tokens", "3",
                           "--compression", "sap")
    assert rc2 == 0


@pytest.mark.parametrize("case,args,message", [
    ("missing image", ["--image", "{tmp}/nope.png", "--prompt", "5 <learnable>"], "no such file"),
    ("unreadable image", ["--image", "{tmp}/bad.png", "--prompt", "5 <learnable>"], "cannot read"),
    ("directory as image", ["--image", "{tmp}", "--prompt", "5 <learnable>"], "directory"),
    ("no slot", ["--image", "{img}", "--prompt", "<image> 5 6"], "no query slot"),
    ("two images", ["--image", "{img}", "--prompt", "<image> 5 <image> <learnable>"],
     "one <image>"),
    ("not token ids", ["--image", "{img}", "--prompt", "What is this? <learnable>"],
     "not a token id"),
    ("too long", ["--image", "{img}", "--prompt", "5 <learnable>", "--max-new-tokens", "600"],
     "exceed the context of 512"),
    ("out of vocabulary", ["--image", "{img}", "--prompt", "5 99999 <learnable>"],
     "outside the vocabulary"),
    ("bad checkpoint", ["--image", "{img}", "--prompt", "5 <learnable>", "--checkpoint", "{tmp}"],
     "no weights"),
    ("missing tokenizer", ["--image", "{img}", "--prompt", "hi", "--tokenizer", "{tmp}/none"],
     "tokenizer"),
    ("negative temperature", ["--image", "{img}", "--prompt", "5 <learnable>", "--temperature",
                              "-1"], "temperature"),
])
def test_bad_input_gets_a_message_not_a_traceback(capsys, tmp_path, image, case, args, message):
    (tmp_path / "bad.png").write_text("not an image")
    args = [a.format(tmp=tmp_path, img=image) for a in args]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2, (case, out, err)
    assert err.startswith("error:") and message in err, err
    assert "Traceback" not in err


def test_raw_prompt_without_a_slot_is_refused(capsys, image, tokenizer_file):
    rc, _, err = run_cli(capsys, "--image", image, "--prompt", "<image>\nWhat is this?", "--raw",
                         "--tokenizer", tokenizer_file)
    assert rc == 2 and "no query slot" in err


def test_module_entry_point(image):
    proc = subprocess.run(
        [sys.executable, "-m", "flashsloth.generate", "--image", image, "--prompt",
         "5 <learnable>", "--max-new-tokens", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) >= 1


# ---------------------------------------------------------------- bad checkpoints and flags
def _bad_checkpoint(tmp_path, how):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    FlashSloth(FlashSlothConfig.preset("tiny")).save_pretrained(str(ckpt))
    cfg_file, weights = ckpt / "config.json", ckpt / "model.safetensors"
    data = json.loads(cfg_file.read_text())
    if how == "heads=0":
        data["flashsloth_kernels"]["text"]["num_attention_heads"] = 0
        cfg_file.write_text(json.dumps(data))
    elif how == "config list":
        cfg_file.write_text(json.dumps([data]))
    elif how == "config not json":
        cfg_file.write_text("{oops")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "int tensor":
        state = load_file(str(weights))
        state["lm_head.weight"] = state["lm_head.weight"].to(torch.int64)
        save_file(state, str(weights))
    elif how == "fp8 dtype":
        data["torch_dtype"] = "float8_e4m3fn"
        cfg_file.write_text(json.dumps(data))
    return str(ckpt)


@pytest.mark.parametrize("how,message", [
    ("heads=0", "text.num_attention_heads: expected an int >= 1, got 0"),
    ("config list", "expected a JSON object, got a list"),
    ("config not json", "not valid JSON"),
    ("truncated", "truncated"),
    ("empty", "empty file"),
    ("int tensor", "integer / bool / complex tensors for floating-point parameters"),
    ("fp8 dtype", "torch_dtype"),
])
def test_bad_checkpoints_get_one_line_and_exit_2(capsys, tmp_path, image, how, message):
    ckpt = _bad_checkpoint(tmp_path, how)
    rc, out, err = run_cli(capsys, "--image", image, "--prompt", "5 <learnable>",
                           "--checkpoint", ckpt)
    assert rc == 2, (how, out, err)
    assert err.startswith("error:") and message in err and "\n" not in err, err


@pytest.mark.parametrize("flags,message", [
    (["--device", "bogus"], "--device: expected cpu or cuda"),
    (["--device", "meta"], "meta device holds no weights"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
     "--device cuda"),
    (["--temperature", "nan"], "--temperature: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "0"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_flags_get_one_line_and_exit_2(capsys, image, flags, message):
    rc, out, err = run_cli(capsys, "--image", image, "--prompt", "5 <learnable>", *flags)
    assert rc == 2, (flags, out, err)
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_a_tiny_temperature_samples_like_greedy(capsys, image):
    base = ["--image", image, "--prompt", "5 6 <learnable>", "--max-new-tokens", "4"]
    rc, greedy, err = run_cli(capsys, *base)
    assert rc == 0, err
    rc, tiny_t, err = run_cli(capsys, *base, "--temperature", "1e-45")
    assert rc == 0, err
    assert tiny_t == greedy


def test_cli_stops_on_the_checkpoints_end_tokens(capsys, image, tmp_path):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    FlashSloth(FlashSlothConfig.preset("tiny")).save_pretrained(str(ckpt))
    args = ["--image", image, "--prompt", "5 6 <learnable>", "--checkpoint", str(ckpt),
            "--max-new-tokens", "8"]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    free = [int(t) for t in out.split()]
    assert len(free) == 8 and 2 not in free        # no eos in this random model's answer
    stop = free[3]
    cut = free[:free.index(stop)]
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0 and [int(t) for t in out.split()] == cut, err
    (ckpt / "generation_config.json").unlink()
    (ckpt / "added_tokens.json").write_text(json.dumps({"</s>": stop}))
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0 and [int(t) for t in out.split()] == cut, err
