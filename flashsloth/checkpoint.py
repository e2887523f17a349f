"""Checkpoints in the original FlashSloth layout: config.json plus safetensors shards (or
PyTorch .bin files), with the original parameter names.

Name mapping (this package <-> original):

  vision_tower.*               <-> model.vision_tower.vision_tower.vision_model.*
  pooling.*                    <-> model.pooling.*            (SAP: mlp.0, mlp.3)
  mm_projector.*               <-> model.mm_projector.*       (0, 2)
  learnable_tokens.token       <-> model.learnable_tokens.token
  lqformer.*                   <-> model.lqformer.*           (EmbQ)
  language_model.lm_head.*     <-> lm_head.*
  language_model.*             <-> model.*          (embed_tokens, layers.N, final_layernorm)

Keys ignored on load (present in some checkpoints, unused by the model):
  - the vision tower's post_layernorm.* and head.* (FlashSloth replaces both by Identity),
    encoder layers past the selected one (the original deletes the last layer) and
    embeddings.position_ids (a buffer older transformers versions saved);
  - *.rotary_emb.inv_freq (a buffer older transformers versions saved; recomputed here);
  - modules the chosen compression mode does not build: model.pooling.* for every mode but
    "flashsloth" and "sap", model.learnable_tokens.* and model.lqformer.* for every mode but
    "flashsloth".
Any other unknown key, any missing key and any shape mismatch raises CheckpointError listing
them. Nothing is ever unpickled: safetensors files, or torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .config import FlashSlothConfig, VisionConfig

Tensor = torch.Tensor

# (this package's prefix, the original's prefix); the first match wins in either direction
PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("pooling.", "model.pooling."),
    ("mm_projector.", "model.mm_projector."),
    ("learnable_tokens.", "model.learnable_tokens."),
    ("lqformer.", "model.lqformer."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model."),
)
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message lists every missing, unexpected and
    mis-shaped key."""


def to_original_key(key: str) -> str:
    for ours, orig in PREFIXES:
        if key.startswith(ours):
            return orig + key[len(ours):]
    raise KeyError(f"no original name for parameter {key!r}")


def from_original_key(key: str) -> Optional[str]:
    """This package's name for an original key, or None when it maps to nothing."""
    for ours, orig in PREFIXES:
        if key.startswith(orig):
            return ours + key[len(orig):]
    return None


def _ignored(key: str, config: FlashSlothConfig) -> bool:
    """True for original keys the model does not use by design (see the module docstring)."""
    if key.startswith(VISION_PREFIX):
        rest = key[len(VISION_PREFIX):]
        if rest.startswith(("post_layernorm.", "head.")) or rest == "embeddings.position_ids":
            return True
        m = re.match(r"encoder\.layers\.(\d+)\.", rest)
        if m and int(m.group(1)) >= config.vision.num_built_layers:
            return True
    if key.endswith(".rotary_emb.inv_freq"):
        return True
    if config.compression not in ("flashsloth", "sap") and key.startswith("model.pooling."):
        return True
    if not config.use_queries and key.startswith(("model.learnable_tokens.", "model.lqformer.")):
        return True
    return False


# ---------------------------------------------------------------------------- reading files
def weight_files(path: str) -> List[str]:
    """The weight files of a checkpoint directory (safetensors preferred over .bin)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint: {path!r} is not a directory")
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as fh:
                weight_map = json.load(fh).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise CheckpointError(f"checkpoint {path!r}: {index_name} names shards that do not "
                                      f"exist: {missing}")
            return [os.path.join(path, f) for f in files]
    names = sorted(os.listdir(path))
    st = [n for n in names if n.endswith(".safetensors")]
    if st:
        return [os.path.join(path, n) for n in st]
    bins = [n for n in names if n.endswith(".bin") and n.startswith("pytorch_model")]
    if bins:
        return [os.path.join(path, n) for n in bins]
    raise CheckpointError(f"checkpoint {path!r}: no weights (model.safetensors, "
                          "model-*.safetensors or pytorch_model*.bin)")


def iter_tensors(files: Iterable[str]):
    """(original key, tensor) for every tensor of the files, one file in memory at a time."""
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(
                    f"checkpoint file {file!r} cannot be read with torch.load(weights_only=True) "
                    f"({type(exc).__name__}: {exc}); only plain tensor state dicts are loaded, "
                    "nothing is unpickled") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"checkpoint file {file!r}: expected a state dict, got "
                                      f"{type(state).__name__}")
            for key, value in state.items():
                if not isinstance(value, Tensor):
                    raise CheckpointError(f"checkpoint file {file!r}: {key!r} is a "
                                          f"{type(value).__name__}, not a tensor")
                yield key, value


def tensor_shapes(files: Iterable[str]) -> Dict[str, Tuple[int, ...]]:
    """Original key -> shape, reading only the safetensors headers where possible."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        else:
            for key, value in iter_tensors([file]):
                shapes[key] = tuple(value.shape)
    return shapes


# ---------------------------------------------------------------------------- config
def read_config(path: str, shapes: Dict[str, Tuple[int, ...]]) -> FlashSlothConfig:
    """The model config of a checkpoint directory.

    This package's own checkpoints carry the full config under "flashsloth_kernels". An
    original config.json describes only the LLM and a few multimodal fields: the vision tower
    (google/siglip-so400m-patch14-384 there, fetched by name) is read from the weights' shapes,
    with so400m's head size 72 (heads = hidden / 72) and depth (27 layers for a 1152-wide
    tower; otherwise the saved layers are taken as exactly those before the cut). The query
    count, EmbQ sizes (heads = the LLM's heads, as the original) come from the weights.
    """
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path!r}: no config.json")
    try:
        with open(file) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path!r}: config.json is not valid JSON ({exc})") \
            from exc
    if "flashsloth_kernels" in data:
        return FlashSlothConfig.from_original_dict(data)
    select = data.get("mm_vision_select_layer")
    changes = {"vision": _vision_from_shapes(shapes, -2 if select is None else int(select))}
    tok = shapes.get("model.learnable_tokens.token")
    if tok is not None:
        changes["num_queries"] = tok[0]
    down = shapes.get("model.lqformer.down_projector_image.weight")
    if down is not None:
        changes["embq_down_dim"] = down[0]
    n_embq = _count_layers(shapes, "model.lqformer.layers.")
    if n_embq:
        changes["embq_num_layers"] = n_embq
    return FlashSlothConfig.from_original_dict(data, **changes)


def _count_layers(shapes, prefix: str) -> int:
    """1 + the largest N among keys "{prefix}N.*" (0 when there is none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for m in map(pattern.match, shapes) if m]
    return max(indices) + 1 if indices else 0


def _vision_from_shapes(shapes, select_layer: int) -> VisionConfig:
    pe = shapes.get(VISION_PREFIX + "embeddings.patch_embedding.weight")
    pos = shapes.get(VISION_PREFIX + "embeddings.position_embedding.weight")
    fc1 = shapes.get(VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")
    if pe is None or pos is None or fc1 is None:
        return VisionConfig(select_layer=select_layer)   # the load reports the missing keys
    hidden, channels, patch = pe[0], pe[1], pe[2]
    grid = math.isqrt(pos[0])
    n_saved = _count_layers(shapes, VISION_PREFIX + "encoder.layers.")
    so400m = hidden == 1152 and patch == 14 and grid == 27
    if so400m:
        depth = 27
    else:
        depth = n_saved - select_layer - 1 if select_layer < 0 else n_saved
    # SigLIP's patch conv floors: 384 px / 14 = 27 patches, so so400m's input size is 384
    return VisionConfig(image_size=384 if so400m else grid * patch, patch_size=patch,
                        num_channels=channels, hidden_size=hidden, intermediate_size=fc1[0],
                        num_hidden_layers=depth,
                        num_attention_heads=16 if so400m else max(1, hidden // 72),
                        select_layer=select_layer)


# ---------------------------------------------------------------------------- load / save
def _listing(title: str, items: List[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {shown}{more}"


def check_keys(expected: Dict[str, Tuple[int, ...]], got: Dict[str, Tuple[int, ...]],
               config: FlashSlothConfig, path: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys (original names)."""
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected and not _ignored(k, config))
    mismatched = sorted(f"{k} (checkpoint {list(got[k])}, model {list(expected[k])})"
                        for k in expected if k in got and tuple(got[k]) != tuple(expected[k]))
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {path!r} does not fit the {config.compression!r} model"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        raise CheckpointError("; ".join(parts))


def load_pretrained(cls, path: str, *, dtype: Optional[torch.dtype] = None, device="cpu",
                    compression: Optional[str] = None,
                    config: Optional[FlashSlothConfig] = None):
    """Build the model on the meta device and fill it from the checkpoint (no double copy).

    Args:
        path: checkpoint directory (config.json + model*.safetensors or pytorch_model*.bin).
        dtype: parameter dtype (default: config.json's torch_dtype, else the stored dtype).
        device: where the parameters go.
        compression: override the mode ("sap", "avgpool", "none": the unused modules' keys
            are ignored, see the module docstring).
        config: use this config instead of reading config.json.
    """
    files = weight_files(path)
    shapes = tensor_shapes(files)
    cfg = config if config is not None else read_config(path, shapes)
    if compression is not None:
        cfg = cfg.replace(compression=compression)
    cfg.validate()
    model = cls(cfg, device="meta")
    expected = {to_original_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, shapes, cfg, path)
    if dtype is None:
        dtype = _config_dtype(path) or _first_float_dtype(files)
    state = {}
    for key, value in iter_tensors(files):
        if key in expected:
            state[from_original_key(key)] = value.to(device=device, dtype=dtype if
                                                     value.is_floating_point() else value.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:
        raise CheckpointError(f"checkpoint {path!r}: tensors left unloaded: {leftover}")
    return model.eval()


def _config_dtype(path: str) -> Optional[torch.dtype]:
    with open(os.path.join(path, "config.json")) as fh:
        name = json.load(fh).get("torch_dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else None


def _first_float_dtype(files) -> torch.dtype:
    for _, value in iter_tensors(files):
        if value.is_floating_point():
            return value.dtype
    return torch.float32


def save_pretrained(model, path: str, *, max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write config.json and model.safetensors (or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json above ``max_shard_bytes``) with the original key names."""
    from safetensors.torch import save_file

    state = {to_original_key(k): v.detach() for k, v in model.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise ValueError("save_pretrained: the model is on the meta device (no weights to save)")
    os.makedirs(path, exist_ok=True)
    shards: List[Dict[str, Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key].to("cpu").contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(path, SAFETENSORS_INDEX), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    cfg = model.config.to_original_dict()
    cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
