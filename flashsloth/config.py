"""Configuration of the slim FlashSloth model, its presets and the original config.json fields.

``FlashSlothConfig`` holds three parts: ``vision`` (the SigLIP tower), ``text`` (the Phi-2
language model) and the FlashSloth glue (compression mode, SAP window, query tokens, EmbQ).

Presets (``FlashSlothConfig.preset(name, **overrides)``):

  "tiny"                 random-init toy sizes: a forward on CPU well under a second (tests,
                         the CPU benchmark default)
  "flashsloth-3.2b"      the original sizes (SigLIP so400m + Phi-2), 90 visual tokens
  "flashsloth-hd-3.2b"   the same with HD tiling, 414 visual tokens

Build the 3.2B presets on the meta device to count parameters or FLOPs without allocating
memory: ``FlashSloth(FlashSlothConfig.preset("flashsloth-3.2b"), device="meta")``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

COMPRESSIONS = ("flashsloth", "sap", "avgpool", "none", "visionzip", "fastv", "random",
                "downsample")
# The peers' mechanisms (flashsloth/compression/): each keeps ``budget_per_view`` visual tokens
PEER_COMPRESSIONS = ("visionzip", "fastv", "random", "downsample")
# How a base-mode image becomes a square (the original's config.json "image_aspect_ratio"):
# "squash" resizes without keeping the aspect ratio; "pad" first pads the short side with the
# image mean colour (the original's expand2square). HD mode always pads its tiles.
ASPECT_RATIOS = ("squash", "pad")
# Parameter dtypes a model may be built or loaded in
MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")

# Token ids of the original release (flashsloth/constants.py there): the image placeholder is
# not a vocabulary entry (it is replaced by visual tokens before embedding), "<learnable>" is
# an added Phi-2 token, and the embedding of id 764 is added to the query tokens at every
# forward ("dot_tokens" in the original).
IMAGE_TOKEN_ID = -200
QUERY_TOKEN_ID = 50295
QUERY_OFFSET_TOKEN_ID = 764
IGNORE_INDEX = -100


@dataclass
class VisionConfig:
    """SigLIP vision tower. ``num_hidden_layers`` is the depth of the full tower; the model
    builds only the layers up to ``select_layer`` (-2: the second-to-last layer's output)."""

    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    select_layer: int = -2

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_built_layers(self) -> int:
        """Encoder layers actually built: the output of the last one is the feature."""
        sel = self.select_layer
        return self.num_hidden_layers + 1 + sel if sel < 0 else sel


@dataclass
class TextConfig:
    """Phi-2 language model."""

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    resid_pdrop: float = 0.1
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = 50256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.partial_rotary_factor * self.head_dim)


@dataclass
class FlashSlothConfig:
    """Everything the model needs; see the module docstring for the presets.

    Glue fields:
      compression: "flashsloth" (SAP + query tokens + EmbQ), "sap" (SAP, no queries),
        "avgpool" (window x window average pooling, no queries), "none" (every patch, no queries).
      hd: 5 views per image (a squashed global view + 2 x 2 tiles of the padded image).
      sap_window: pooling window (3: 27 x 27 patches -> 81 tokens per view).
      num_queries: learnable query tokens inserted at each slot (9).
      embq_layer: the decoder layer (counting from 1, as the paper) whose input EmbQ updates (8).
      embq_down_dim, embq_num_heads, embq_num_layers: EmbQ sizes (576, 32, 1).
      image_token_id / query_token_id: ids marking the image and the query slot in input_ids.
      query_offset_token_id: token whose embedding is added to the query tokens (764; None: off).
      question_skip_after_image: tokens skipped after the image when locating the question
        (1: the newline after "<image>", as the original).
      question_skip_after_answer: tokens skipped after a labelled answer before the next
        question in multi-turn training data (2: the "USER:" role tokens, as the original).
      hd_grid: tiles per side in HD mode (2).
      image_aspect_ratio: "squash" (resize without keeping the aspect) or "pad" (pad the short
        side with the mean colour first, the original's "pad"); base mode only.

    Fields of the peer modes ("visionzip", "fastv", "random", "downsample"; see
    flashsloth/compression/):
      token_budget: visual tokens each view keeps (None: FlashSloth's per-view budget,
        ceil(grid / sap_window)^2 = 81 at 27 x 27, what "sap" and "avgpool" give; 90 matches
        FlashSloth's 81 + 9 query tokens of a base image).
      visionzip_contextual: of those, how many are VisionZip's merged contextual tokens (None:
        round(budget * 10 / 64), VisionZip's 54 + 10 split of 64; the rest are dominant).
      fastv_layer: FastV's K, the decoder layers that see every visual token (2); the
        pruning uses the attention of layer K and acts at the input of layer K + 1.
      compression_seed: the seed of "random"'s choice of patches (0).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    compression: str = "flashsloth"
    hd: bool = False
    hd_grid: int = 2
    sap_window: int = 3
    num_queries: int = 9
    embq_layer: int = 8
    embq_down_dim: int = 576
    embq_num_heads: int = 32
    embq_num_layers: int = 1
    image_token_id: int = IMAGE_TOKEN_ID
    query_token_id: int = QUERY_TOKEN_ID
    query_offset_token_id: Optional[int] = QUERY_OFFSET_TOKEN_ID
    question_skip_after_image: int = 1
    question_skip_after_answer: int = 2
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    image_aspect_ratio: str = "squash"
    token_budget: Optional[int] = None
    visionzip_contextual: Optional[int] = None
    fastv_layer: int = 2
    compression_seed: int = 0

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = _only_fields(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _only_fields(TextConfig, self.text, "text")
        if isinstance(self.image_mean, list):
            self.image_mean = tuple(self.image_mean)
        if isinstance(self.image_std, list):
            self.image_std = tuple(self.image_std)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def use_queries(self) -> bool:
        """Query tokens and EmbQ exist only in the "flashsloth" mode; the baselines have none."""
        return self.compression == "flashsloth"

    @property
    def num_views(self) -> int:
        return 1 + self.hd_grid ** 2 if self.hd else 1

    @property
    def tokens_per_view(self) -> int:
        """Visual tokens per view inserted into the LLM's input sequence."""
        g = self.vision.grid_size
        if self.compression in ("none", "fastv"):     # fastv prunes inside the LLM
            return g * g
        if self.compression in PEER_COMPRESSIONS:
            return self.budget_per_view
        per_side = -(-g // self.sap_window)
        return per_side * per_side

    @property
    def budget_per_view(self) -> int:
        """Visual tokens per view the peer modes keep: ``token_budget``, else FlashSloth's
        ceil(grid / sap_window)^2 (81 at 27 x 27)."""
        if self.token_budget is not None:
            return self.token_budget
        per_side = -(-self.vision.grid_size // self.sap_window)
        return per_side * per_side

    @property
    def visionzip_split(self) -> tuple:
        """(dominant, contextual) tokens per view of "visionzip"."""
        k = self.budget_per_view
        c = (self.visionzip_contextual if self.visionzip_contextual is not None
             else min(k - 1, round(k * 10 / 64)))
        return k - c, c

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens that replace one image placeholder (all views)."""
        return self.num_views * self.tokens_per_view

    def num_visual_tokens(self) -> int:
        """Visual tokens reaching the LLM per image: image tokens plus one set of query tokens.

        90 for "flashsloth-3.2b", 414 for "flashsloth-hd-3.2b", 81 with compression="sap" or
        "avgpool", 729 with "none".
        """
        return self.num_image_tokens + (self.num_queries if self.use_queries else 0)

    def num_visual_tokens_kept(self) -> int:
        """Visual tokens left in the LLM's sequence after every compression step: as
        ``num_visual_tokens()``, except "fastv", whose 729 per view enter the LLM and
        ``budget_per_view`` per view remain from layer ``fastv_layer`` + 1 on."""
        if self.compression == "fastv":
            return self.num_views * min(self.budget_per_view, self.vision.num_patches)
        return self.num_visual_tokens()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check every field's type and range, then the relations between fields; a ValueError
        names the field, the value and what is allowed."""
        if not isinstance(self.vision, VisionConfig):
            raise ValueError(f"vision: expected a VisionConfig or a dict of its fields, got "
                             f"{_show(self.vision)}")
        if not isinstance(self.text, TextConfig):
            raise ValueError(f"text: expected a TextConfig or a dict of its fields, got "
                             f"{_show(self.text)}")
        v, t = self.vision, self.text
        for owner, prefix, specs in ((v, "vision.", _VISION_FIELDS), (t, "text.", _TEXT_FIELDS),
                                     (self, "", _GLUE_FIELDS)):
            for name, spec in specs.items():
                _check_field(prefix + name, getattr(owner, name), *spec)
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression: expected one of {', '.join(COMPRESSIONS)}, "
                             f"got {self.compression!r}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio: expected one of {', '.join(ASPECT_RATIOS)}, "
                             f"got {self.image_aspect_ratio!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            ok = (isinstance(value, (tuple, list)) and len(value) == v.num_channels
                  and all(_is_real(x) and math.isfinite(x) for x in value)
                  and (name == "image_mean" or all(x > 0 for x in value)))
            if not ok:
                what = "finite numbers" if name == "image_mean" else "finite numbers > 0"
                raise ValueError(f"{name}: expected {v.num_channels} (vision.num_channels) "
                                 f"{what}, got {_show(value)}")
        if v.hidden_size % v.num_attention_heads:
            raise ValueError(f"vision.hidden_size ({v.hidden_size}) must be divisible by "
                             f"vision.num_attention_heads ({v.num_attention_heads})")
        if v.grid_size < 1:
            raise ValueError(f"vision.image_size ({v.image_size}) is smaller than one patch "
                             f"({v.patch_size})")
        if not 1 <= v.num_built_layers <= v.num_hidden_layers:
            raise ValueError(f"vision.select_layer ({v.select_layer}) selects no layer of a "
                             f"{v.num_hidden_layers}-layer tower (expected "
                             f"-{v.num_hidden_layers}..-1 or 1..{v.num_hidden_layers})")
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"text.hidden_size ({t.hidden_size}) must be divisible by "
                             f"text.num_attention_heads ({t.num_attention_heads})")
        if t.rotary_dim % 2 or t.rotary_dim < 2:
            raise ValueError(f"text.partial_rotary_factor ({t.partial_rotary_factor}): rotary "
                             f"dims int(partial_rotary_factor * head_dim {t.head_dim}) = "
                             f"{t.rotary_dim} must be even and >= 2")
        for name in ("eos_token_id", "pad_token_id"):
            tid = getattr(t, name)
            if tid is not None and not 0 <= tid < t.vocab_size:
                raise ValueError(f"text.{name}: {tid} is outside the vocabulary "
                                 f"[0, {t.vocab_size})")
        if self.sap_window > v.grid_size:
            raise ValueError(f"sap_window: expected an int in 1..{v.grid_size} (the patch grid), "
                             f"got {self.sap_window}")
        if self.use_queries:
            if not 1 <= self.embq_layer <= t.num_hidden_layers:
                raise ValueError(f"embq_layer: expected 1..{t.num_hidden_layers} (decoder "
                                 f"layers, counted from 1), got {self.embq_layer}")
            if self.embq_down_dim % self.embq_num_heads or v.hidden_size % self.embq_num_heads:
                raise ValueError(
                    f"embq_num_heads ({self.embq_num_heads}) must divide embq_down_dim "
                    f"({self.embq_down_dim}) and vision.hidden_size ({v.hidden_size})")
        if (self.query_offset_token_id is not None
                and not 0 <= self.query_offset_token_id < t.vocab_size):
            raise ValueError(f"query_offset_token_id: {self.query_offset_token_id} is outside "
                             f"the vocabulary [0, {t.vocab_size})")
        if self.image_token_id == self.query_token_id:
            raise ValueError(f"image_token_id and query_token_id must differ, both are "
                             f"{self.image_token_id}")
        _validate_peer_fields(self)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "FlashSlothConfig":
        """A named preset, with top-level fields (or ``vision`` / ``text`` dicts) overridden."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
        base = PRESETS[name]()
        data = base.to_dict()
        for key, value in overrides.items():
            if key in ("vision", "text") and isinstance(value, dict):
                data[key].update(value)
            elif key in data:
                data[key] = value
            else:
                raise ValueError(f"preset {name!r}: unknown field {key!r}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "FlashSlothConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "FlashSlothConfig":
        if not isinstance(data, dict):
            raise ValueError(f"FlashSlothConfig: expected a dict of fields, got {_show(data)}")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"FlashSlothConfig: unknown fields {unknown}")
        vision = data.pop("vision", {})
        text = data.pop("text", {})
        if isinstance(vision, dict):
            vision = _only_fields(VisionConfig, vision, "vision")
        if isinstance(text, dict):
            text = _only_fields(TextConfig, text, "text")
        return cls(vision=vision, text=text, **data)

    def to_original_dict(self) -> Dict[str, Any]:
        """config.json fields in the original release's layout (a PhiConfig plus the LLaVA-style
        multimodal fields), with this package's full config under "flashsloth_kernels"."""
        t, v = self.text, self.vision
        return {
            "architectures": ["FlashSlothForCausalLM"],
            "model_type": "flashsloth",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_attention_heads,
            "hidden_act": "gelu_new",
            "partial_rotary_factor": t.partial_rotary_factor,
            "rope_theta": t.rope_theta,
            "layer_norm_eps": t.layer_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "resid_pdrop": t.resid_pdrop,
            "bos_token_id": t.eos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "qk_layernorm": False,
            "tie_word_embeddings": False,
            "mm_vision_tower": "google/siglip-so400m-patch14-384",
            "mm_hidden_size": v.hidden_size,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": v.select_layer,
            "mm_vision_select_feature": "patch",
            "image_hd": self.hd,
            "image_aspect_ratio": "pad" if self.image_aspect_ratio == "pad" else "square",
            "image_token_index": self.image_token_id,
            "flashsloth_kernels": self.to_dict(),
        }

    @classmethod
    def from_original_dict(cls, data: Dict[str, Any], **overrides: Any) -> "FlashSlothConfig":
        """Read a config.json: this package's block when present, else the original fields
        (Phi-2 fields for the LLM; the vision tower is SigLIP so400m unless said otherwise;
        EmbQ has as many heads as the LLM, as the original). ``overrides`` replace fields
        (e.g. ``vision`` read from the weights) before the config is validated."""
        if not isinstance(data, dict):
            raise ValueError(f"config.json: expected a JSON object, got {_show(data)}")
        if "flashsloth_kernels" in data:
            block = data["flashsloth_kernels"]
            if not isinstance(block, dict):
                raise ValueError(f"flashsloth_kernels: expected a JSON object, got {_show(block)}")
            return cls.from_dict({**block, **overrides})

        def get(name: str, kind: str, *bounds, optional: bool = False):
            value = data.get(name)
            if value is None:
                return None
            _check_field(name, value, kind, *bounds, optional=optional)
            return value

        text = TextConfig()
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = get(name, "int", 1)
            if value is not None:
                setattr(text, name, int(value))
        for name in ("eos_token_id", "pad_token_id"):
            if name in data:     # an explicit null means "none"
                value = get(name, "int", 0, optional=True)
                setattr(text, name, None if value is None else int(value))
        for name in ("partial_rotary_factor", "rope_theta", "layer_norm_eps", "resid_pdrop"):
            value = get(name, "float")
            if value is not None:
                setattr(text, name, float(value))
        rp = data.get("rope_parameters")
        if rp is not None:
            if not isinstance(rp, dict):
                raise ValueError(f"rope_parameters: expected a JSON object, got {_show(rp)}")
            for name in ("rope_theta", "partial_rotary_factor"):
                if rp.get(name) is not None:
                    _check_field(f"rope_parameters.{name}", rp[name], "float")
                    setattr(text, name, float(rp[name]))
        kv = get("num_key_value_heads", "int", 1)
        if kv is not None and kv != text.num_attention_heads:
            raise ValueError(f"config.json: num_key_value_heads = {kv} (grouped-query attention) "
                             "is not supported; Phi-2 uses multi-head attention")
        if data.get("qk_layernorm"):
            raise ValueError("config.json: qk_layernorm = true is not supported (Phi-2 has none)")
        act = data.get("hidden_act", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (Phi-2: gelu_new)")
        proj = data.get("mm_projector_type", "mlp2x_gelu")
        if proj != "mlp2x_gelu":
            raise ValueError(f"config.json: mm_projector_type {proj!r} is not supported "
                             "(FlashSloth: mlp2x_gelu)")
        vision = VisionConfig()
        if get("mm_hidden_size", "int", 1) is not None:
            vision.hidden_size = int(data["mm_hidden_size"])
        if get("mm_vision_select_layer", "int") is not None:
            vision.select_layer = int(data["mm_vision_select_layer"])
        hd = get("image_hd", "bool")
        aspect = data.get("image_aspect_ratio")
        if aspect not in (None, "pad", "square", "squash"):
            raise ValueError(f"image_aspect_ratio: expected \"pad\" or \"square\" (squash), "
                             f"got {_show(aspect)}")
        if data.get("image_token_index") is not None:
            get("image_token_index", "int")
        fields = {"vision": vision, "text": text, "hd": bool(hd),
                  "image_aspect_ratio": "pad" if aspect == "pad" else "squash",
                  "embq_num_heads": text.num_attention_heads}
        return cls(**{**fields, **overrides})


# ---------------------------------------------------------------------------- field checks
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _show(value) -> str:
    """The value as written, with its type when that is not a number (e.g. '64' (str))."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if _is_real(value) else f"{text} ({type(value).__name__})"


def _check_field(name: str, value, kind: str, lo=None, hi=None, optional: bool = False,
                 lo_open: bool = False) -> None:
    """kind "int": an int (not a bool, not 3.0); "float": a finite int or float; "bool"; "str".
    lo / hi: inclusive bounds (lo exclusive with lo_open); optional: None allowed."""
    if value is None and optional:
        return
    if kind == "int":
        ok = _is_int(value)
        want = "an int"
    elif kind == "float":
        ok = _is_real(value) and math.isfinite(value)
        want = "a finite number"
    elif kind == "bool":
        ok = isinstance(value, bool)
        want = "true or false"
    else:
        ok = isinstance(value, str)
        want = "a string"
    if ok and lo is not None and (value <= lo if lo_open else value < lo):
        ok = False
    if ok and hi is not None and value > hi:
        ok = False
    if not ok:
        if lo is not None and hi is not None:
            want += f" in {'(' if lo_open else '['}{lo}, {hi}]"
        elif lo is not None:
            want += f" {'>' if lo_open else '>='} {lo}"
        elif hi is not None:
            want += f" <= {hi}"
        if optional:
            want += " or null"
        raise ValueError(f"{name}: expected {want}, got {_show(value)}")


# field -> (kind, lo, hi, optional, lo_open); relations between fields are checked in validate()
_VISION_FIELDS = {
    "image_size": ("int", 1), "patch_size": ("int", 1), "num_channels": ("int", 1, 4),
    "hidden_size": ("int", 1), "intermediate_size": ("int", 1), "num_hidden_layers": ("int", 1),
    "num_attention_heads": ("int", 1), "layer_norm_eps": ("float", 0, None, False, True),
    "select_layer": ("int",),
}
_TEXT_FIELDS = {
    "vocab_size": ("int", 1), "hidden_size": ("int", 1), "intermediate_size": ("int", 1),
    "num_hidden_layers": ("int", 1), "num_attention_heads": ("int", 1),
    "partial_rotary_factor": ("float", 0, 1, False, True),
    "rope_theta": ("float", 0, None, False, True),
    "layer_norm_eps": ("float", 0, None, False, True),
    "max_position_embeddings": ("int", 1), "resid_pdrop": ("float", 0, 1),
    "eos_token_id": ("int", 0, None, True), "pad_token_id": ("int", 0, None, True),
}
_GLUE_FIELDS = {
    "compression": ("str",), "hd": ("bool",), "hd_grid": ("int", 1), "sap_window": ("int", 1),
    "num_queries": ("int", 1), "embq_layer": ("int", 1), "embq_down_dim": ("int", 1),
    "embq_num_heads": ("int", 1), "embq_num_layers": ("int", 1), "image_token_id": ("int",),
    "query_token_id": ("int",), "query_offset_token_id": ("int", 0, None, True),
    "question_skip_after_image": ("int", 0), "question_skip_after_answer": ("int", 0),
    "image_aspect_ratio": ("str",),
    # the peer modes' fields; their relations (budget <= patches, ...) in _validate_peer_fields
    "token_budget": ("int", 1, None, True), "visionzip_contextual": ("int", 0, None, True),
    "fastv_layer": ("int", 1), "compression_seed": ("int",),
}


def check_model_dtype(name: str, dtype) -> None:
    """Refuse parameter dtypes the model cannot run in (integers, bool, complex, float8)."""
    import torch

    if dtype is None:
        return
    allowed = tuple(getattr(torch, n) for n in MODEL_DTYPES)
    if dtype not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")


def _validate_peer_fields(cfg: "FlashSlothConfig") -> None:
    """The peer modes' fields (token_budget, visionzip_contextual, fastv_layer,
    compression_seed)."""
    n = cfg.vision.num_patches
    if cfg.token_budget is not None and not (_is_int(cfg.token_budget)
                                             and 1 <= cfg.token_budget <= n):
        raise ValueError(f"token_budget: expected None or an int in 1..{n} (the patches of a "
                         f"view), got {cfg.token_budget!r}")
    k = cfg.budget_per_view
    if cfg.visionzip_contextual is not None and not (_is_int(cfg.visionzip_contextual)
                                                     and 0 <= cfg.visionzip_contextual < k):
        raise ValueError(f"visionzip_contextual: expected None or an int in 0..{k - 1} (at "
                         f"least one of the {k} tokens is dominant), got "
                         f"{cfg.visionzip_contextual!r}")
    layers = cfg.text.num_hidden_layers
    if not _is_int(cfg.fastv_layer) or cfg.fastv_layer < 1 or (
            cfg.compression == "fastv" and cfg.fastv_layer >= layers):
        raise ValueError(f"fastv_layer: expected an int in 1..{layers - 1} (the decoder layers "
                         f"that see every visual token, of {layers}), got {cfg.fastv_layer!r}")
    if not _is_int(cfg.compression_seed):
        raise ValueError(f"compression_seed: expected an int, got {cfg.compression_seed!r}")


def _only_fields(klass, values: Dict[str, Any], what: str):
    if not isinstance(values, dict):
        raise ValueError(f"{what}: expected a dict of fields, got {_show(values)}")
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown} (expected some of "
                         f"{', '.join(sorted(known))})")
    return klass(**values)


def _tiny() -> FlashSlothConfig:
    # 84 px / patch 14 = a 6 x 6 grid: 4 SAP tokens per view; every width divisible by the
    # head counts; vocab 1024 keeps id 764 (the query offset token) inside the vocabulary.
    return FlashSlothConfig(
        vision=VisionConfig(image_size=84, patch_size=14, hidden_size=48, intermediate_size=96,
                            num_hidden_layers=3, num_attention_heads=4, select_layer=-2),
        text=TextConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, partial_rotary_factor=0.4,
                        max_position_embeddings=512, eos_token_id=2, pad_token_id=0),
        num_queries=9, embq_layer=2, embq_down_dim=32, embq_num_heads=4,
        query_token_id=1000,
    )


def _base() -> FlashSlothConfig:
    return FlashSlothConfig()


def _hd() -> FlashSlothConfig:
    return FlashSlothConfig(hd=True)


PRESETS = {
    "tiny": _tiny,
    "flashsloth-3.2b": _base,
    "flashsloth-hd-3.2b": _hd,
}


def num_visual_tokens(config: "FlashSlothConfig | str") -> int:
    """Visual tokens reaching the LLM per image for a config or a preset name."""
    if isinstance(config, str):
        config = FlashSlothConfig.preset(config)
    return config.num_visual_tokens()
