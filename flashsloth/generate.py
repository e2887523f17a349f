"""Command line: answer a question about an image.

    python -m flashsloth.generate --image img.png --prompt "What is in the picture?" \\
        --checkpoint path/to/FlashSloth-3.2B            # original-layout checkpoint directory
    python -m flashsloth.generate --image img.png --prompt "<image> 12 7 99 <learnable> 5" \\
        --preset tiny                                   # random weights, token ids

With a tokenizer (``--tokenizer`` file or directory holding tokenizer.json; by default the
checkpoint directory's), the prompt is the question, wrapped in the original "phi2"
conversation template with "<image>\\n" before it and the query slot "<learnable>" after it;
``--raw`` uses the prompt as written (it must then hold "<learnable>"). Without a tokenizer
the prompt is token ids with the markers "<image>" (added at the start when absent) and
"<learnable>" (required in the "flashsloth" mode). The answer is printed as text, or as token
ids without a tokenizer. Generation stops on the checkpoint's own end tokens, as the original:
the config's eos (<|endoftext|>), "</s>" (the released fine-tune ends every answer with it)
when the tokenizer has it, and any generation_config.json eos_token_id in the checkpoint
folder. Bad input (flags, files, checkpoints) ends with one line "error: ..." on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

import torch

from .config import COMPRESSIONS, PRESETS, FlashSlothConfig
from .preprocess import (IMAGE_MARKER, SLOT_MARKER, SYSTEM_PROMPT, Tokenizer, build_prompt,
                         parse_token_ids)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashsloth.generate",
                                description="Answer a question about an image with FlashSloth.")
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument("--prompt", required=True,
                   help="the question (or token ids without a tokenizer)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint directory in the original FlashSloth layout")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random-init preset (default: tiny)")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding it "
                                       "(default: the checkpoint's, if any)")
    p.add_argument("--compression", choices=COMPRESSIONS, help="override the compression mode")
    p.add_argument("--raw", action="store_true", help="use the prompt as written, no template")
    p.add_argument("--system", default=SYSTEM_PROMPT, help="system prompt of the template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the random init and of sampling")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    return p


class UsageError(ValueError):
    """Bad command-line input, reported without a traceback."""


def load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise UsageError(f"--image: no such file: {path!r}")
    if os.path.isdir(path):
        raise UsageError(f"--image: {path!r} is a directory, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise UsageError(f"--image: cannot read {path!r} as an image ({exc})") from None


def build_input_ids(args, config: FlashSlothConfig, tokenizer: Optional[Tokenizer]) -> List[int]:
    if tokenizer is not None:
        if args.raw:
            text = args.prompt
            if IMAGE_MARKER not in text:
                text = IMAGE_MARKER + "\n" + text
        else:
            text = build_prompt(args.prompt, system=args.system, with_slot=config.use_queries)
        ids = tokenizer.encode_prompt(text, config)
    else:
        ids = parse_token_ids(args.prompt, config)
        if config.image_token_id not in ids:
            ids = [config.image_token_id] + ids
    if ids.count(config.image_token_id) != 1:
        raise UsageError(f"--prompt: expected one {IMAGE_MARKER} marker, got "
                         f"{ids.count(config.image_token_id)}")
    if config.use_queries and config.query_token_id not in ids:
        raise UsageError(f"--prompt: no query slot {SLOT_MARKER}: FlashSloth puts its query tokens "
                         "after the question, e.g. \"<image>\\nWhat is this?<learnable>\" "
                         "(or pass a --compression without query tokens, e.g. sap)")
    return ids


def check_device(name: str) -> torch.device:
    """--device: cpu, or cuda[:N] when that device exists."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available (this torch: "
                             f"{torch.__version__}, CUDA {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UsageError(f"--device: expected cpu or cuda[:N], got {name!r}"
                         + (" (the meta device holds no weights to generate with)"
                            if dev.type == "meta" else ""))
    return dev


def check_args(args) -> None:
    """Every flag's value, before any work."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature: expected a finite number >= 0 (0: greedy), got "
                         f"{args.temperature}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: expected an int >= 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k: expected an int >= 1, got {args.top_k}")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise UsageError(f"--top-p: expected a number in (0, 1], got {args.top_p}")
    check_device(args.device)


def stop_ids(model, args, tokenizer: Optional[Tokenizer]) -> List[int]:
    """The checkpoint's own end tokens (config eos, "</s>" of the released fine-tune,
    generation_config.json) plus the tokenizer's <|endoftext|> and "</s>"."""
    from .checkpoint import stop_token_ids

    if args.checkpoint:
        ids = list(stop_token_ids(args.checkpoint, model.config, tokenizer))
    else:
        ids = list(model.stop_token_ids)
    if tokenizer is not None:
        for token in ("<|endoftext|>", "</s>"):
            tid = tokenizer.token_to_id(token)
            if tid is not None and 0 <= tid < model.config.text.vocab_size and tid not in ids:
                ids.append(tid)
    return ids


def run(args) -> str:
    from .checkpoint import CheckpointError
    from .model import FlashSloth

    check_args(args)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    image = load_image(args.image)
    try:
        if args.checkpoint:
            if not os.path.isdir(args.checkpoint):
                raise UsageError(f"--checkpoint: {args.checkpoint!r} is not a directory")
            model = FlashSloth.from_pretrained(args.checkpoint, dtype=dtype, device=args.device,
                                               compression=args.compression)
        else:
            overrides = {"compression": args.compression} if args.compression else {}
            cfg = FlashSlothConfig.preset(args.preset or "tiny", **overrides)
            model = FlashSloth(cfg, device=args.device, dtype=dtype).eval()
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    config = model.config
    tok_path = args.tokenizer
    if tok_path is None and args.checkpoint and os.path.isfile(os.path.join(args.checkpoint,
                                                                             "tokenizer.json")):
        tok_path = args.checkpoint
    tokenizer = Tokenizer(tok_path) if tok_path else None
    ids = build_input_ids(args, config, tokenizer)
    stops = stop_ids(model, args, tokenizer)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate([image], torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                         do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                         top_k=args.top_k, top_p=args.top_p, eos_token_id=stops or None,
                         generator=gen)
    new = out[0].tolist()
    for i, tok in enumerate(new):
        if tok in stops:
            new = new[:i]
            break
    return tokenizer.decode(new).strip() if tokenizer is not None else " ".join(map(str, new))


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except (UsageError, ValueError, TypeError, OSError, ImportError) as exc:
        # OSError: unreadable files (permissions, I/O); one line, never a traceback
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
