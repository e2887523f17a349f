"""The slim FlashSloth reference model built on flashsloth_kernels' fused ops.

    from flashsloth import FlashSloth, FlashSlothConfig
    model = FlashSloth(FlashSlothConfig.preset("tiny"))            # random weights
    model = FlashSloth.from_pretrained("path/to/FlashSloth-3.2B")  # original checkpoint
    meta = FlashSloth(FlashSlothConfig.preset("flashsloth-3.2b"), device="meta")  # sizes only

See docs/model.md.
"""

from .checkpoint import CheckpointError
from .config import (COMPRESSIONS, PRESETS, FlashSlothConfig, TextConfig, VisionConfig,
                     num_visual_tokens)
from .language import KVCache
from .model import FlashSloth, FlashSlothOutput
from .preprocess import Tokenizer, build_prompt, preprocess_images

__all__ = [
    "COMPRESSIONS",
    "PRESETS",
    "CheckpointError",
    "FlashSloth",
    "FlashSlothConfig",
    "FlashSlothOutput",
    "KVCache",
    "TextConfig",
    "Tokenizer",
    "VisionConfig",
    "build_prompt",
    "num_visual_tokens",
    "preprocess_images",
]
