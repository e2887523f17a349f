"""A synthetic grounding data set: coloured glyphs on a grid, questions about one cell.

Every image is a ``grid x grid`` board of cells, one small glyph per cell (a shape in a
colour on black). A question names one cell (chessboard style: column letter, row number,
"e2") and asks for the colour or the shape of its glyph::

    USER: <image>\\nwhat colour is the shape at e2 ?<learnable> ASSISTANT: red

With the defaults the board matches the "tiny" preset exactly: 6 x 6 cells of 14 px = an
84 x 84 image, one cell per vision patch. A 3 x 3 pooling window (SAP or average pooling)
then holds 9 glyphs, so the pooled tokens cannot keep which colour and which shape sit in
which cell; the answer needs an instruction-guided look-up of the un-pooled patch of the
named cell, which is what EmbQ does. Guessing gives 1 / len(COLOURS) (colour questions) and
1 / len(SHAPES) (shape questions); knowing only which glyphs a window holds, not where,
gives more than chance but less than a look-up.

Output directory (``python -m flashsloth.synthetic --out DIR``)::

    DIR/images/train_000000.png ...   the boards (PNG, grid * cell pixels square)
    DIR/train.jsonl, DIR/test.jsonl    records in the trainer's format (see flashsloth.data)
    DIR/tokenizer.json                 a word-level tokenizer (HF ``tokenizers`` format) whose
                                       vocabulary fits the tiny preset's 1024 ids
    DIR/meta.json                      the generator's arguments

Each JSONL record: ``{"id", "image", "conversations": [{"from": "human", "value": question},
{"from": "gpt", "value": answer}, ...], "cell": [row, col] of each turn, "kind": ...}``; the
extra keys are ignored by the trainer and used by the evaluation. Everything is drawn from
one ``numpy`` generator seeded by ``--seed``: the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle", "cross")
KINDS = ("colour", "shape")

# Ids the tiny preset relies on: pad 0, eos 2 (its TextConfig); "\n" gets its own id so that
# "<image>\n" is one token after the image, as Phi-2's tokenizer makes it.
SPECIAL = ("<pad>", "<unk>", "<eos>")
TEMPLATE_WORDS = ("\n", "USER:", "ASSISTANT:", "?")
QUESTION_WORDS = ("what", "colour", "is", "the", "shape", "at")


@dataclass
class GroundingSpec:
    """Generator arguments.

    grid: cells per side; cell: pixels per cell (the board is grid * cell pixels square; keep
    cell = the vision patch size so one cell is one patch); turns: questions per image;
    test_turns: questions per held-out image (None: ``turns``; the grounding experiment trains
    on several questions per board and scores one per held-out board); kinds: question kinds
    ("colour", "shape"); min_fill: each training board fills a fraction
    drawn uniformly from [min_fill, 1] of its cells (the asked cells always hold a glyph, the
    rest stay black). Sparse boards are an easier start (the asked glyph often has its pooling
    window nearly to itself); held-out boards are always full. 1.0: every board is full.
    """

    grid: int = 6
    cell: int = 14
    train: int = 4000
    test: int = 500
    turns: int = 1
    kinds: Tuple[str, ...] = KINDS
    seed: int = 0
    min_fill: float = 1.0
    test_turns: Optional[int] = None

    def validate(self) -> None:
        for name in ("grid", "cell", "turns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        t = self.test_turns
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"test_turns: expected None or an int >= 1, got {t!r}")
        if self.cell < 6:
            raise ValueError(f"cell: glyphs need at least 6 pixels per cell, got {self.cell}")
        if self.grid > 26:
            raise ValueError(f"grid: at most 26 cells per side (columns are letters), "
                             f"got {self.grid}")
        for name in ("train", "test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        bad = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or bad:
            raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {self.kinds!r}")
        if not 0.0 <= self.min_fill <= 1.0:
            raise ValueError(f"min_fill: expected a fraction in [0, 1], got {self.min_fill!r}")


def vocabulary(grid: int) -> List[str]:
    """Every word the data set uses, specials first (ids 0, 1, 2 = pad, unk, eos)."""
    cells = [cell_name(r, c) for r in range(1, grid + 1) for c in range(1, grid + 1)]
    return list(SPECIAL) + list(TEMPLATE_WORDS) + list(QUESTION_WORDS) + cells \
        + list(COLOURS) + list(SHAPES)


def tokenizer_json(grid: int) -> dict:
    """A HF ``tokenizers`` word-level tokenizer: "\\n" is a token of its own, other words are
    separated by spaces; "<pad>" and "<eos>" are special (dropped when decoding)."""
    vocab = {w: i for i, w in enumerate(vocabulary(grid))}
    added = [{"id": vocab[w], "content": w, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for w in ("<pad>", "<eos>")]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\n"}, "behavior": "Isolated", "invert": False},
            {"type": "Split", "pattern": {"Regex": "[^\\S\n]+"}, "behavior": "Removed",
             "invert": False}]},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def draw_glyph(pixels: np.ndarray, top: int, left: int, size: int, shape: str,
               colour: Tuple[int, int, int]) -> None:
    """Paint one glyph into the (H, W, 3) uint8 board, inside the cell at (top, left)."""
    m = max(1, size // 7)                        # margin: glyphs never touch their neighbours
    n = size - 2 * m
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    c = n / 2
    if shape == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 <= (n / 2) ** 2
    elif shape == "square":
        inset = n * 0.1
        mask = (yy >= inset) & (yy <= n - inset) & (xx >= inset) & (xx <= n - inset)
    elif shape == "triangle":                    # apex up: width grows linearly with the row
        mask = np.abs(xx - c) <= yy / 2
    elif shape == "cross":
        w = max(1.0, n / 5)
        mask = (np.abs(yy - c) <= w) | (np.abs(xx - c) <= w)
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
    region = pixels[top + m:top + m + n, left + m:left + m + n]
    region[mask] = colour


def draw_board(cells: Sequence[Sequence[Optional[Tuple[str, str]]]], cell: int) -> np.ndarray:
    """cells[r][c] = (shape, colour name) or None (empty) -> (grid * cell, grid * cell, 3)
    uint8 image, black where there is no glyph."""
    g = len(cells)
    pixels = np.zeros((g * cell, g * cell, 3), dtype=np.uint8)
    for r in range(g):
        for c in range(g):
            if cells[r][c] is not None:
                shape, colour = cells[r][c]
                draw_glyph(pixels, r * cell, c * cell, cell, shape, COLOURS[colour])
    return pixels


def cell_name(row: int, col: int) -> str:
    """A cell's name as on a chessboard: column letter ("a" = 1) then row number, "c4". One
    word per cell, so the question names its cell with one token."""
    return f"{chr(ord('a') + col - 1)}{row}"


def question(kind: str, row: int, col: int) -> str:
    """The question text for a cell (rows and columns counted from 1)."""
    what = "colour is the shape" if kind == "colour" else "shape is"
    return f"what {what} at {cell_name(row, col)} ?"


def make_record(rng: np.random.Generator, spec: GroundingSpec, image: str,
                index: int, split: str) -> Tuple[dict, np.ndarray]:
    """One board and its record (the image path is stored as given)."""
    g = spec.grid
    colours = list(COLOURS)
    shape_idx = rng.integers(0, len(SHAPES), size=(g, g))
    colour_idx = rng.integers(0, len(colours), size=(g, g))
    turns = spec.turns if split == "train" or spec.test_turns is None else spec.test_turns
    asked = [tuple(int(v) for v in rng.integers(0, g, size=2)) for _ in range(turns)]
    kinds = [spec.kinds[int(rng.integers(0, len(spec.kinds)))] for _ in range(turns)]
    filled = np.ones((g, g), dtype=bool)
    if split == "train" and spec.min_fill < 1.0:
        fill = rng.uniform(spec.min_fill, 1.0)
        filled = rng.random((g, g)) < fill
    for r, c in asked:
        filled[r, c] = True
    cells = [[(SHAPES[shape_idx[r, c]], colours[colour_idx[r, c]]) if filled[r, c] else None
              for c in range(g)] for r in range(g)]
    conv = []
    for turn, ((r, c), kind) in enumerate(zip(asked, kinds)):
        text = question(kind, r + 1, c + 1)
        if turn == 0:
            text = "<image>\n" + text
        answer = cells[r][c][1] if kind == "colour" else cells[r][c][0]
        conv += [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
    record = {"id": f"{split}_{index:06d}", "image": image, "conversations": conv,
              "cell": [[r + 1, c + 1] for r, c in asked], "kind": kinds}
    return record, draw_board(cells, spec.cell)


def generate(out: str, spec: Optional[GroundingSpec] = None) -> Dict[str, str]:
    """Write the data set to ``out`` (see the module docstring); returns the written paths."""
    from PIL import Image

    spec = spec or GroundingSpec()
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    paths = {}
    for split, count in (("train", spec.train), ("test", spec.test)):
        path = os.path.join(out, f"{split}.jsonl")
        with open(path, "w") as fh:
            for i in range(count):
                image = f"images/{split}_{i:06d}.png"
                record, pixels = make_record(rng, spec, image, i, split)
                Image.fromarray(pixels).save(os.path.join(out, image), optimize=False)
                fh.write(json.dumps(record) + "\n")
        paths[split] = path
    paths["tokenizer"] = os.path.join(out, "tokenizer.json")
    with open(paths["tokenizer"], "w") as fh:
        json.dump(tokenizer_json(spec.grid), fh, ensure_ascii=False)
    paths["meta"] = os.path.join(out, "meta.json")
    with open(paths["meta"], "w") as fh:
        json.dump({**asdict(spec), "kinds": list(spec.kinds), "colours": list(COLOURS),
                   "shapes": list(SHAPES)}, fh, indent=2)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashsloth.synthetic",
                                description="Write the synthetic grounding data set.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=GroundingSpec.train, help="training images")
    p.add_argument("--test", type=int, default=GroundingSpec.test, help="held-out images")
    p.add_argument("--grid", type=int, default=GroundingSpec.grid, help="cells per side")
    p.add_argument("--cell", type=int, default=GroundingSpec.cell,
                   help="pixels per cell (the vision patch size: 14)")
    p.add_argument("--turns", type=int, default=GroundingSpec.turns, help="questions per image")
    p.add_argument("--test-turns", type=int, default=None,
                   help="questions per held-out image (default: --turns)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="question kinds, comma-separated (colour, shape)")
    p.add_argument("--min-fill", type=float, default=GroundingSpec.min_fill,
                   help="training boards fill a fraction in [min-fill, 1] of their cells")
    p.add_argument("--seed", type=int, default=GroundingSpec.seed)
    args = p.parse_args(argv)
    spec = GroundingSpec(grid=args.grid, cell=args.cell, train=args.train, test=args.test,
                         turns=args.turns, test_turns=args.test_turns,
                         kinds=tuple(k for k in args.kinds.split(",") if k),
                         seed=args.seed, min_fill=args.min_fill)
    try:
        paths = generate(args.out, spec)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {spec.train} training and {spec.test} held-out boards to {args.out} "
          f"({paths['train']}, {paths['test']}, {paths['tokenizer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
