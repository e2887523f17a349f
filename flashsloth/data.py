"""Training data: a JSONL file of images and conversations, tokenised into labelled sequences.

Format: one JSON object per line (LLaVA's conversation records, one per line)::

    {"id": "0001", "image": "images/0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the colour of the car?"},
                       {"from": "gpt",   "value": "Red."},
                       {"from": "human", "value": "And the sky?"},
                       {"from": "gpt",   "value": "Blue."}]}

- ``image``: a file PIL can read; a relative path is taken from ``image_root`` (default: the
  JSONL file's directory). It is preprocessed as the model does (flashsloth.preprocess: squash
  to the tower's size, bicubic, mean/std 0.5; HD tiling with an HD config).
- ``conversations``: alternating "human" / "gpt" turns ("user" / "assistant" also accepted),
  starting with a human turn; a "<image>" marker in the text is optional (the image always
  goes first, as the original moves it there). Optional ``system`` overrides the system prompt.
- Any other key is ignored.

Each line becomes one sequence in the original "phi2" template, with one query slot
("<learnable>") per turn, after the question::

    {system} USER: <image>\\n{q1}<learnable> ASSISTANT: {a1}<eos>
      USER: {q2}<learnable> ASSISTANT: {a2}<eos>          (one sequence; the line break is not)

Labels are the answer tokens and each answer's end-of-sequence token; everything else
(system prompt, questions, role words, image and query slots) is -100, so the loss is on
answers only. ``question_mask`` marks each turn's question tokens (what EmbQ attends to),
given to the model explicitly so the look-up does not depend on how a tokenizer splits
"<image>\\n" or the role words.

Bad lines (not UTF-8, not JSON or nested too deeply, no image key, missing or unreadable
image, no answer, turns out of order, longer than ``max_length`` after inserting the visual
and query tokens) are collected as :class:`DataIssue` (line number and reason):
``on_bad="skip"`` drops them and reports each, ``on_bad="error"`` raises :class:`DataError`
listing them all. Nothing is dropped silently. A UTF-8 byte-order mark opening the file is
ignored. Each problem is its own line's only.

Images are checked when the file is read: ``check_images="header"`` (default, fast) opens
each and runs PIL's ``verify()``; ``"decode"`` decodes every image fully (catches truncated
JPEGs and corrupt PNG data whose checksums are valid, at the cost of reading every pixel).
An image that passes the check but fails to decode when its sample is loaded is not an
exception either: the item comes back with ``issue`` set (its ``file:line`` and reason), a
blank image and no labels, so it adds nothing to the loss or the gradients and keeps batch
shapes (and every process's step count) unchanged; the trainer reports it like any other bad
line, or stops with ``--on-bad error``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .config import IGNORE_INDEX, FlashSlothConfig
from .preprocess import IMAGE_MARKER, SLOT_MARKER, SYSTEM_PROMPT, preprocess_image

Tensor = torch.Tensor

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


@dataclass
class DataIssue:
    """A line of a data file that cannot be trained on: ``path:line: reason``."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class DataError(ValueError):
    """Bad lines in a data file (raised with ``on_bad="error"``); ``.issues`` lists them."""

    def __init__(self, issues: Sequence[DataIssue]):
        self.issues = list(issues)
        shown = "\n  ".join(str(i) for i in self.issues[:50])
        more = f"\n  ... and {len(self.issues) - 50} more" if len(self.issues) > 50 else ""
        super().__init__(f"{len(self.issues)} bad line(s) in the training data:\n  {shown}{more}")


@dataclass
class Example:
    """One tokenised line: input_ids, labels, question_mask are (T,) aligned lists."""

    line: int
    image: str
    input_ids: List[int]
    labels: List[int]
    question_mask: List[bool]
    num_turns: int


def expanded_length(num_ids: int, num_turns: int, config: FlashSlothConfig) -> int:
    """Positions the model sees: the image marker becomes the visual tokens and every slot
    Q query tokens ("flashsloth") or nothing (the baselines)."""
    slots = num_turns * (config.num_queries - 1 if config.use_queries else -1)
    return num_ids - 1 + config.num_image_tokens + slots


class ConversationEncoder:
    """Turns a record's conversations into (input_ids, labels, question_mask).

    tokenizer: anything with ``encode(text) -> list[int]`` (e.g. flashsloth.preprocess.Tokenizer).
    """

    def __init__(self, tokenizer, config: FlashSlothConfig, system: Optional[str] = SYSTEM_PROMPT):
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"tokenizer: expected an object with encode(text) -> ids, "
                            f"got {type(tokenizer).__name__}")
        eos = config.text.eos_token_id
        if eos is None:
            raise ValueError("config.text.eos_token_id: the trainer labels an end-of-sequence "
                             "token after each answer; the config has none")
        self.tokenizer = tokenizer
        self.config = config
        self.system = system or ""
        self.eos = eos

    def _text(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text)) if text else []

    def encode(self, turns: Sequence[tuple], system: Optional[str] = None):
        """turns: [(question, answer), ...] -> (ids, labels, question_mask) lists."""
        cfg = self.config
        ids: List[int] = []
        labels: List[int] = []
        qmask: List[bool] = []

        def add(tokens: List[int], labelled: bool = False, question: bool = False):
            ids.extend(tokens)
            labels.extend(tokens if labelled else [IGNORE_INDEX] * len(tokens))
            qmask.extend([question] * len(tokens))

        system = self.system if system is None else system
        for i, (q, a) in enumerate(turns):
            if i == 0:
                add(self._text(f"{system} USER: " if system else "USER: "))
                add([cfg.image_token_id])
                add(self._text("\n"))
            else:
                add(self._text(" USER: "))
            add(self._text(q), question=True)
            add([cfg.query_token_id])
            add(self._text(" ASSISTANT:"))
            add(self._text(" " + a) + [self.eos], labelled=True)
        return ids, labels, qmask


def _clean_question(text: str) -> str:
    """The question without the image / slot markers (the template places both)."""
    text = text.replace(SLOT_MARKER, "")
    if IMAGE_MARKER in text:
        text = text.replace(IMAGE_MARKER, "").strip("\n").strip()
    return text


def parse_record(obj, line: int) -> tuple:
    """(image, [(question, answer), ...], system or None) of a decoded line; raises ValueError
    with the reason for a bad one."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("no \"image\" (a path) in the record")
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("no \"conversations\" list in the record")
    turns = []
    for i in range(0, len(conv), 2):
        human = conv[i]
        if not isinstance(human, dict) or human.get("from") not in HUMAN_ROLES:
            raise ValueError(f"conversations[{i}]: expected a human turn "
                             f"({{\"from\": \"human\", \"value\": ...}}), got {human!r:.80}")
        if i + 1 >= len(conv):
            raise ValueError(f"no answer: conversations[{i}] (a question) has no gpt turn after it")
        gpt = conv[i + 1]
        if not isinstance(gpt, dict) or gpt.get("from") not in ASSISTANT_ROLES:
            raise ValueError(f"conversations[{i + 1}]: expected a gpt turn, got {gpt!r:.80}")
        q, a = human.get("value"), gpt.get("value")
        if not isinstance(q, str):
            raise ValueError(f"conversations[{i}]: \"value\" is not a string")
        if not isinstance(a, str) or not a.strip():
            raise ValueError(f"no answer: conversations[{i + 1}] has an empty \"value\"")
        turns.append((_clean_question(q), a.strip()))
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("\"system\" must be a string")
    return image, turns, system


CHECK_IMAGES = ("header", "decode", "none")
UTF8_BOM = b"\xef\xbb\xbf"


def _decode_line(raw: bytes, n: int) -> str:
    """A line's text; ValueError with the reason for bytes that are not UTF-8."""
    if n == 1 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of "
                         "the line)") from None


def _parse_json(text: str):
    """json.loads; ValueError with the reason for text that is not JSON or nests too deeply."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse (Python's recursion limit)") from None


def read_examples(path: str, encoder: ConversationEncoder, *, image_root: Optional[str] = None,
                  max_length: Optional[int] = None, check_images="header"):
    """Tokenise every line of a JSONL file.

    check_images: "header" (PIL verify()), "decode" (full decode) or "none"; True / False
    mean "header" / "none".

    Returns (examples, issues): the good lines as :class:`Example` and the bad ones as
    :class:`DataIssue` (1-based line numbers; blank lines are neither).
    """
    if check_images is True:
        check_images = "header"
    elif check_images is False:
        check_images = "none"
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images: expected one of {', '.join(CHECK_IMAGES)}, got "
                         f"{check_images!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: no file {path!r}")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    cfg = encoder.config
    limit = max_length if max_length is not None else cfg.text.max_position_embeddings
    examples: List[Example] = []
    issues: List[DataIssue] = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                text = _decode_line(raw, n)
                if not text.strip():
                    continue
                obj = _parse_json(text)
            except ValueError as exc:
                issues.append(DataIssue(path, n, str(exc)))
                continue
            try:
                image, turns, system = parse_record(obj, n)
            except ValueError as exc:
                issues.append(DataIssue(path, n, str(exc)))
                continue
            image_path = image if os.path.isabs(image) else os.path.join(root, image)
            if check_images != "none":
                reason = _image_problem(image_path, decode=check_images == "decode")
                if reason:
                    issues.append(DataIssue(path, n, reason))
                    continue
            ids, labels, qmask = encoder.encode(turns, system)
            length = expanded_length(len(ids), len(turns), cfg)
            if length > limit:
                issues.append(DataIssue(path, n, f"too long: {length} positions with the "
                                                 f"visual and query tokens, the limit is "
                                                 f"{limit}"))
                continue
            examples.append(Example(n, image_path, ids, labels, qmask, len(turns)))
    return examples, issues


def _image_problem(path: str, decode: bool = False) -> Optional[str]:
    """Why an image cannot be used (None when PIL can read its header, and with ``decode``
    its pixels)."""
    if not os.path.isfile(path):
        return f"missing image: {path}"
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
        if decode:
            with Image.open(path) as im:
                im.load()
    except Exception as exc:  # PIL raises many types for broken files
        return f"unreadable image: {path} ({type(exc).__name__}: {exc})"
    return None


class ConversationDataset(Dataset):
    """A JSONL data file as training samples (see the module docstring for the format).

    Args:
        path: the JSONL file.
        tokenizer: ``encode(text) -> ids`` (flashsloth.preprocess.Tokenizer for a tokenizer.json).
        config: the model's config (image size, HD, marker ids, query count, context).
        system: system prompt of the template (a record's "system" key overrides it).
        image_root: directory of relative image paths (default: the JSONL file's directory).
        max_length: longest expanded sequence (default: config.text.max_position_embeddings).
        on_bad: "skip" (drop bad lines, listed in ``.issues`` and reported through ``report``)
            or "error" (raise DataError listing every bad line).
        cache_images: keep preprocessed pixel values in memory after first use.
        report: called with each DataIssue when skipping (default: print to stderr).
        check_images: "header" (PIL verify(), default), "decode" (decode every image now)
            or "none" (see the module docstring).

    Item: dict(pixel_values (3, S, S) / (V, 3, S, S), input_ids (T,), labels (T,),
    question_mask (T,) bool, line int, issue: None, or the DataIssue of an image that failed
    to decode (the item then has a blank image and no labels)).
    """

    def __init__(self, path: str, tokenizer, config: FlashSlothConfig, *,
                 system: Optional[str] = SYSTEM_PROMPT, image_root: Optional[str] = None,
                 max_length: Optional[int] = None, on_bad: str = "skip",
                 cache_images: bool = False, report=None, check_images: str = "header"):
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad: expected 'skip' or 'error', got {on_bad!r}")
        self.path = path
        self.config = config
        self.on_bad = on_bad
        self.encoder = ConversationEncoder(tokenizer, config, system)
        self.examples, self.issues = read_examples(path, self.encoder, image_root=image_root,
                                                   max_length=max_length,
                                                   check_images=check_images)
        if self.issues:
            if on_bad == "error":
                raise DataError(self.issues)
            if report is None:
                import sys

                def report(issue):
                    print(f"skipped {issue}", file=sys.stderr)
            for issue in self.issues:
                report(issue)
        if not self.examples:
            raise ValueError(f"data: {path!r} holds no usable line "
                             f"({len(self.issues)} bad, see the report above)")
        self._cache: Dict[str, Tensor] = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.examples)

    def pixel_values(self, image: str) -> Tensor:
        if self._cache is not None and image in self._cache:
            return self._cache[image]
        from PIL import Image

        with Image.open(image) as im:
            px = preprocess_image(im, self.config, name=image)
        if self._cache is not None:
            self._cache[image] = px
        return px

    def _blank_pixels(self) -> Tensor:
        S = self.config.vision.image_size
        shape = (self.config.num_views, 3, S, S) if self.config.hd else (3, S, S)
        return torch.zeros(shape)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        issue = None
        labels = torch.tensor(ex.labels, dtype=torch.long)
        try:
            pixels = self.pixel_values(ex.image)
        except Exception as exc:  # PIL raises many types for undecodable data
            issue = DataIssue(self.path, ex.line, f"undecodable image: {ex.image} "
                                                  f"({type(exc).__name__}: {exc})")
            pixels = self._blank_pixels()
            labels = torch.full_like(labels, IGNORE_INDEX)   # contributes nothing
        return {
            "pixel_values": pixels,
            "input_ids": torch.tensor(ex.input_ids, dtype=torch.long),
            "labels": labels,
            "question_mask": torch.tensor(ex.question_mask, dtype=torch.bool),
            "line": ex.line,
            "issue": issue,
        }


def collate(samples: Sequence[dict], pad_token_id: int = 0) -> dict:
    """Stack samples into a batch, right-padded (the model re-pads on the left itself).

    Returns images (B, 3, S, S) / (B, V, 3, S, S), input_ids (B, T), attention_mask (B, T)
    bool, labels (B, T) (-100 on padding), question_mask (B, T) bool, lines (list of int),
    issues (the DataIssue of every sample whose image failed to decode; those rows carry no
    labels).
    """
    if not samples:
        raise ValueError("collate: got no samples")
    B = len(samples)
    T = max(s["input_ids"].numel() for s in samples)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    qmask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        ids[b, :n] = s["input_ids"]
        mask[b, :n] = True
        labels[b, :n] = s["labels"]
        qmask[b, :n] = s["question_mask"]
    return {"images": torch.stack([s["pixel_values"] for s in samples]), "input_ids": ids,
            "attention_mask": mask, "labels": labels, "question_mask": qmask,
            "lines": [s["line"] for s in samples],
            "issues": [s["issue"] for s in samples if s.get("issue") is not None]}


class ShardedSampler(Sampler):
    """Deterministic shuffled order per epoch, split across ranks, resumable mid-epoch.

    Epoch e's order is a permutation drawn from ``seed + e``; rank r takes every
    ``world_size``-th index of it, starting at r (the order is padded by wrapping so every
    rank gets the same count, as DistributedSampler). ``start`` skips the first samples of
    this rank's share (a resumed run restarts where it stopped without loading the skipped
    samples).
    """

    def __init__(self, size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        if size < 1:
            raise ValueError(f"size: expected >= 1, got {size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0..{world_size - 1}, got {rank}")
        self.size, self.world_size, self.rank = size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start = 0

    @property
    def per_rank(self) -> int:
        return -(-self.size // self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.world_size
        order = (order * (-(-total // self.size)))[:total]
        return iter(order[self.rank::self.world_size][self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)
