"""Image preprocessing as the original release, and prompt building / tokenisation.

Images (PIL images, or uint8 tensors / arrays of shape (H, W, C) or (C, H, W) with C in
{1, 3, 4}) become pixel values:

  base: squash to image_size x image_size (bicubic, aspect not kept), scale to [0, 1],
        normalise with mean 0.5, std 0.5 -> (3, S, S); with ``image_aspect_ratio="pad"``
        (the original config.json's "pad") the image is first padded to a square with the
        mean colour, as the original's expand2square
        (HD mode pads its tiles whatever the setting, and squashes its global view, as the
        original's HD preprocessing)
  HD:   pad to a square with the mean colour (127, 127, 127), resize to 2S x 2S, cut 2 x 2
        tiles of S x S (row-major), and add a global view (the original image squashed to S):
        [global, tile 1..4] -> (5, 3, S, S)

Prompts follow the original "phi2" conversation template:

  "{system} USER: <image>\\n{question}<learnable> ASSISTANT:"

"<image>" becomes ``config.image_token_id`` (replaced by the visual tokens inside the model)
and "<learnable>" becomes ``config.query_token_id`` (the slot of the query tokens).
"""

from __future__ import annotations

import os
import re
from typing import List, Sequence, Union

import numpy as np
import torch

from .config import FlashSlothConfig

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
IMAGE_MARKER = "<image>"
SLOT_MARKER = "<learnable>"

ImageLike = Union["PIL.Image.Image", torch.Tensor, np.ndarray]  # noqa: F821


# ---------------------------------------------------------------------------- images
def to_pil(image: ImageLike, name: str = "image"):
    """A PIL RGB image from a PIL image or a uint8 tensor / array (H, W, C) or (C, H, W)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"{name}: empty image of size {image.size}")
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"{name}: expected a uint8 tensor (pixel values 0..255), got "
                            f"{image.dtype}; pass float pixel values to the model directly")
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{name}: expected a uint8 array (pixel values 0..255), "
                            f"got {image.dtype}")
        array = image
    else:
        raise TypeError(f"{name}: expected a PIL image or a uint8 tensor, "
                        f"got {type(image).__name__}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected shape (H, W, C) or (C, H, W), got {tuple(array.shape)}")
    # Channel-first when the first dim looks like channels and the last does not; when both
    # do, a torch tensor is taken as (C, H, W) (torch's layout), an array as (H, W, C)
    first, last = array.shape[0] in (1, 3, 4), array.shape[2] in (1, 3, 4)
    if first and (not last or isinstance(image, torch.Tensor)):
        array = np.transpose(array, (1, 2, 0))
    H, W, C = array.shape
    if C not in (1, 3, 4):
        raise ValueError(f"{name}: expected 1, 3 or 4 channels (grey, RGB, RGBA) in shape "
                         f"(H, W, C) or (C, H, W), got shape {tuple(image.shape)}")
    if H < 1 or W < 1:
        raise ValueError(f"{name}: empty image of shape {tuple(image.shape)}")
    array = np.ascontiguousarray(array)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[C]
    return Image.fromarray(array[:, :, 0] if C == 1 else array, mode=mode).convert("RGB")


def _normalize(pil, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    # As the original's HF image processor: uint8 -> float64 * (1/255) -> float32, then (x - m) / s
    x = (np.asarray(pil, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def squash(pil, size: int):
    """Resize to size x size without keeping the aspect ratio (bicubic)."""
    from PIL import Image

    return pil.resize((size, size), Image.Resampling.BICUBIC)


def pad_to_square(pil, colour: tuple):
    """Pad the short side symmetrically (extra pixel at the end) with ``colour``."""
    from PIL import Image

    w, h = pil.size
    if w == h:
        return pil
    side = max(w, h)
    out = Image.new(pil.mode, (side, side), colour)
    out.paste(pil, ((side - w) // 2, (side - h) // 2))
    return out


def mean_colour(mean: Sequence[float]) -> tuple:
    """The padding colour of the original's expand2square: int(m * 255) per channel."""
    return tuple(int(m * 255) for m in mean)


def hd_views(pil, size: int, grid: int = 2, mean: Sequence[float] = (0.5, 0.5, 0.5)) -> list:
    """[global view, tile (0, 0), tile (0, 1), ..., tile (grid-1, grid-1)] as PIL images."""
    colour = mean_colour(mean)
    padded = squash(pad_to_square(pil, colour), size * grid)
    tiles = [padded.crop((x * size, y * size, (x + 1) * size, (y + 1) * size))
             for y in range(grid) for x in range(grid)]
    return [squash(pil, size)] + tiles


def preprocess_image(image: ImageLike, config: FlashSlothConfig,
                     name: str = "image") -> torch.Tensor:
    """One image -> (3, S, S) float32, or (5, 3, S, S) with ``config.hd``."""
    pil = to_pil(image, name)
    S = config.vision.image_size
    if config.hd:
        views = hd_views(pil, S, config.hd_grid, config.image_mean)
        return torch.stack([_normalize(v, config.image_mean, config.image_std) for v in views])
    if config.image_aspect_ratio == "pad":
        pil = pad_to_square(pil, mean_colour(config.image_mean))
    return _normalize(squash(pil, S), config.image_mean, config.image_std)


def preprocess_images(images, config: FlashSlothConfig) -> torch.Tensor:
    """A batch: a list of images, one image, or a uint8 tensor (B, H, W, C) / (B, C, H, W).

    Returns pixel values (B, 3, S, S) float32, or (B, 5, 3, S, S) with ``config.hd``.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: got an empty list")
    return torch.stack([preprocess_image(im, config, f"images[{i}]")
                        for i, im in enumerate(images)])


# ---------------------------------------------------------------------------- prompts
def build_prompt(question: str, system: str = SYSTEM_PROMPT, with_image: bool = True,
                 with_slot: bool = True) -> str:
    """The original "phi2" template for one turn, ready for the answer."""
    image = IMAGE_MARKER + "\n" if with_image and IMAGE_MARKER not in question else ""
    slot = SLOT_MARKER if with_slot and SLOT_MARKER not in question else ""
    return f"{system} USER: {image}{question}{slot} ASSISTANT:"


class Tokenizer:
    """A HF ``tokenizers`` tokenizer from a local tokenizer.json (file or directory); never
    downloads anything. ``encode_prompt`` maps "<image>" / "<learnable>" to the config's ids."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:  # not a runtime dependency of the package
            raise ImportError("loading a tokenizer needs the `tokenizers` package: "
                              "pip install tokenizers") from exc
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer: no tokenizer.json at {path!r} (give the file or a "
                                    "directory holding it)")
        try:
            self._tok = _HFTokenizer.from_file(file)
        except Exception as exc:
            raise ValueError(f"tokenizer: cannot read {file!r} as a HF tokenizers file "
                             f"({exc})") from exc
        self.path = file

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def encode_prompt(self, prompt: str, config: FlashSlothConfig) -> List[int]:
        """Token ids with the image and slot markers replaced by the config's ids."""
        ids: List[int] = []
        for piece in re.split(f"({re.escape(IMAGE_MARKER)}|{re.escape(SLOT_MARKER)})", prompt):
            if piece == IMAGE_MARKER:
                ids.append(config.image_token_id)
            elif piece == SLOT_MARKER:
                ids.append(config.query_token_id)
            elif piece:
                ids.extend(self.encode(piece))
        return ids


def parse_token_ids(text: str, config: FlashSlothConfig) -> List[int]:
    """Token ids written as text: integers separated by spaces or commas, with the markers
    "<image>" and "<learnable>" allowed, e.g. "<image> 12 7 99 <learnable> 5"."""
    ids: List[int] = []
    for word in re.split(f"[\\s,]+|({re.escape(IMAGE_MARKER)}|{re.escape(SLOT_MARKER)})", text):
        if not word:
            continue
        if word == IMAGE_MARKER:
            ids.append(config.image_token_id)
        elif word == SLOT_MARKER:
            ids.append(config.query_token_id)
        else:
            try:
                ids.append(int(word))
            except ValueError:
                raise ValueError(f"prompt: {word!r} is not a token id; without a tokenizer the "
                                 "prompt must be token ids (integers) with the markers <image> "
                                 "and <learnable>") from None
    return ids
