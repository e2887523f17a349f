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

import errno
import json
import math
import os
import re
import shutil
import sys
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .config import COMPRESSIONS, FlashSlothConfig, VisionConfig

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
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


def _inside(path: str, name: object, index_file: str) -> str:
    """The full path of shard ``name`` from an index, refusing names that leave the folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise CheckpointError(f"checkpoint file {index_file!r}: shard name {name!r} is not a "
                              "file name inside the checkpoint folder")
    full = os.path.normpath(os.path.join(path, name))
    root = os.path.realpath(path)
    real = os.path.realpath(full)
    if os.path.commonpath([root, real]) != root or ".." in name.split("/"):
        raise CheckpointError(f"checkpoint file {index_file!r}: shard name {name!r} leaves the "
                              f"checkpoint folder {path!r}")
    return full


def read_index(path: str, index_name: str) -> Dict[str, str]:
    """weight_map of an index file: original key -> full shard path, checked."""
    index = os.path.join(path, index_name)
    data = _read_json_object(index, 'a JSON object with a "weight_map"')
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"checkpoint file {index!r}: expected \"weight_map\" to be a "
                              f"non-empty object of tensor name -> shard file, got "
                              f"{type(weight_map).__name__}")
    return {str(k): _inside(path, v, index) for k, v in weight_map.items()}


def weight_files(path: str) -> List[str]:
    """The weight files of a checkpoint directory, exactly: the shards its index names
    (model.safetensors.index.json, else pytorch_model.bin.index.json), else the single
    model.safetensors, else pytorch_model.bin. Other files in the folder are never read."""
    return _weights(path)[0]


def _weights(path: str) -> Tuple[List[str], Optional[Dict[str, str]]]:
    """(files, weight_map or None)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint: {path!r} is not a directory")
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if os.path.isfile(os.path.join(path, index_name)):
            weight_map = read_index(path, index_name)
            files = sorted(set(weight_map.values()))
            missing = [os.path.relpath(f, path) for f in files if not os.path.isfile(f)]
            if missing:
                raise CheckpointError(f"checkpoint {path!r}: {index_name} names shards that do not "
                                      f"exist: {missing}")
            return files, weight_map
    for name in WEIGHT_NAMES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return [file], None
    shards = sorted(n for n in os.listdir(path)
                    if n.endswith((".safetensors", ".bin")) and not n.startswith("."))
    if shards:
        raise CheckpointError(f"checkpoint {path!r}: weight files {shards} but no "
                              f"{SAFETENSORS_INDEX} / {BIN_INDEX} naming them and no "
                              f"{' or '.join(WEIGHT_NAMES)}")
    raise CheckpointError(f"checkpoint {path!r}: no weights (model.safetensors, "
                          f"{SAFETENSORS_INDEX} with its shards, or pytorch_model*.bin)")


# safetensors dtype codes -> (bytes per element, kind); kind "f" floating, "i" integer / bool
_ST_DTYPES = {
    "F64": (8, "f"), "F32": (4, "f"), "F16": (2, "f"), "BF16": (2, "f"),
    "F8_E4M3": (1, "f"), "F8_E5M2": (1, "f"), "F8_E8M0": (1, "f"),
    "I64": (8, "i"), "I32": (4, "i"), "I16": (2, "i"), "I8": (1, "i"), "U64": (8, "i"),
    "U32": (4, "i"), "U16": (2, "i"), "U8": (1, "i"), "BOOL": (1, "i"),
    "C64": (8, "c"),
}
_MAX_HEADER = 100 * 1024 * 1024   # the safetensors library's own limit


def read_safetensors_header(file: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{key: (shape, dtype code)} from a safetensors header, checking the whole layout (sizes,
    offsets, dtypes) against the file size; a CheckpointError names the file and the fault."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {file!r}: {what}")

    try:
        size = os.path.getsize(file)
        with open(file, "rb") as fh:
            head = fh.read(8)
            if size == 0:
                raise bad("empty file (0 bytes), not a safetensors file")
            if len(head) < 8:
                raise bad(f"truncated: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise bad(f"truncated or corrupt header: it claims {n} bytes, the file has "
                          f"{size - 8} after the length field")
            raw = fh.read(n)
    except OSError as exc:
        raise bad(f"cannot be read ({exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"corrupt header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise bad(f"corrupt header (a JSON {type(header).__name__}, expected an object)")
    data_size = size - 8 - n
    out: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if (not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES
                or not isinstance(info.get("shape"), list)
                or not all(isinstance(d, int) and d >= 0 for d in info["shape"])
                or not isinstance(info.get("data_offsets"), list)
                or len(info["data_offsets"]) != 2
                or not all(isinstance(o, int) for o in info["data_offsets"])):
            raise bad(f"corrupt header entry for {key!r}: {str(info)[:120]}")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        nbytes = math.prod(shape) * _ST_DTYPES[info["dtype"]][0]
        if not 0 <= begin <= end or end - begin != nbytes:
            raise bad(f"bad data offsets for {key!r}: [{begin}, {end}) for {nbytes} bytes of "
                      f"{info['dtype']} {list(shape)}")
        if end > data_size:
            raise bad(f"truncated: {key!r} ends at byte {end} of the data, the file holds "
                      f"{data_size}")
        spans.append((begin, end, key))
        out[key] = (shape, info["dtype"])
    spans.sort()
    for (b0, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise bad(f"bad data offsets: {k0!r} and {k1!r} overlap")
    return out


def _kind(dtype) -> str:
    """"f", "i" or "c" for a safetensors dtype code or a torch dtype."""
    if isinstance(dtype, str):
        return _ST_DTYPES[dtype][1]
    if dtype.is_floating_point:
        return "f"
    return "c" if dtype.is_complex else "i"


def _load_bin(file: str) -> Dict[str, Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint file {file!r} cannot be read with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {exc}); only plain tensor state dicts are loaded, "
            "nothing is unpickled") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {file!r}: expected a state dict, got "
                              f"{type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"checkpoint file {file!r}: {key!r} is a "
                                  f"{type(value).__name__}, not a tensor")
    return state


def iter_tensors(files: Iterable[str]):
    """(original key, tensor) for every tensor of the files, one file in memory at a time."""
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(file, framework="pt", device="cpu") as fh:
                    for key in fh.keys():
                        yield key, fh.get_tensor(key)
            except CheckpointError:
                raise
            except Exception as exc:    # SafetensorError, OSError: name the file
                raise CheckpointError(f"checkpoint file {file!r}: cannot be read as safetensors "
                                      f"({type(exc).__name__}: {exc})") from None
        else:
            yield from _load_bin(file).items()


def tensor_infos(files: Iterable[str], weight_map: Optional[Dict[str, str]] = None,
                 ) -> Dict[str, Tuple[Tuple[int, ...], str, str]]:
    """Original key -> (shape, kind "f"/"i"/"c", file), reading only the safetensors headers.
    A key stored in two files, or in another file than the index says, is refused."""
    infos: Dict[str, Tuple[Tuple[int, ...], str, str]] = {}
    for file in files:
        if file.endswith(".safetensors"):
            entries = {k: (shape, _kind(dt)) for k, (shape, dt) in
                       read_safetensors_header(file).items()}
        else:
            entries = {k: (tuple(v.shape), _kind(v.dtype)) for k, v in _load_bin(file).items()}
        for key, (shape, kind) in entries.items():
            if key in infos:
                raise CheckpointError(f"checkpoint: tensor {key!r} is stored in two files, "
                                      f"{infos[key][2]!r} and {file!r}; which one is meant is "
                                      "ambiguous")
            if weight_map is not None and weight_map.get(key) != file:
                where = weight_map.get(key)
                raise CheckpointError(
                    f"checkpoint file {file!r} holds {key!r}, which the index "
                    + (f"places in {where!r}" if where else "does not list"))
            infos[key] = (shape, kind, file)
    if weight_map is not None:
        absent = sorted(k for k in weight_map if k not in infos)
        if absent:
            raise CheckpointError(_listing("checkpoint: tensors the index names but its shards do "
                                           "not hold", absent))
    return infos


def tensor_shapes(files: Iterable[str]) -> Dict[str, Tuple[int, ...]]:
    """Original key -> shape, reading only the safetensors headers where possible."""
    return {k: v[0] for k, v in tensor_infos(list(files)).items()}


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
    data = read_config_json(path)
    try:
        if "flashsloth_kernels" in data:
            return FlashSlothConfig.from_original_dict(data)
        return _config_from_original(data, shapes)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {file!r}: {exc}") from None


def read_config_json(path: str) -> dict:
    """config.json of a checkpoint directory as a dict (CheckpointError naming the file)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path!r}: no config.json")
    return _read_json_object(file, "a JSON object")


def _read_json(file: str):
    """A checkpoint's JSON file, parsed; a CheckpointError naming the file otherwise."""
    try:
        with open(file, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {file!r}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {file!r}: cannot be read ({exc})") from None


def _read_json_object(file: str, expected: str) -> dict:
    """A JSON file that must hold an object; a CheckpointError naming the file otherwise."""
    data = _read_json(file)
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {file!r}: expected {expected}, got a "
                              f"{type(data).__name__}")
    return data


def _config_from_original(data: dict, shapes) -> FlashSlothConfig:
    select = data.get("mm_vision_select_layer")
    if select is not None and (isinstance(select, bool) or not isinstance(select, int)):
        raise ValueError(f"mm_vision_select_layer: expected an int, got {select!r}")
    changes = {"vision": _vision_from_shapes(shapes, -2 if select is None else select)}
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
        path: checkpoint directory (config.json + model.safetensors, or the shards its
            model.safetensors.index.json names, or pytorch_model*.bin). Exactly those files
            are read; a tensor stored in two of them is refused.
        dtype: parameter dtype (default: config.json's torch_dtype, else the stored dtype).
        device: where the parameters go.
        compression: override the mode (one of flashsloth.config.COMPRESSIONS; the unused
            modules' keys are ignored, see the module docstring).
        config: use this config instead of reading config.json.

    The model's ``stop_token_ids`` (where ``generate`` stops by default) are the checkpoint's
    own end tokens: see :func:`stop_token_ids`.
    """
    from .config import check_model_dtype

    check_model_dtype("dtype", dtype)
    files, weight_map = _weights(path)
    infos = tensor_infos(files, weight_map)
    shapes = {k: v[0] for k, v in infos.items()}
    if config is not None and not isinstance(config, FlashSlothConfig):
        raise TypeError(f"config: expected a FlashSlothConfig, got {type(config).__name__}")
    cfg = config if config is not None else read_config(path, shapes)
    if compression is not None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression: expected one of {', '.join(COMPRESSIONS)}, got "
                             f"{compression!r}")
        cfg = cfg.replace(compression=compression)
    cfg.validate()
    # config.json's torch_dtype is checked even when ``dtype`` overrides it
    stored = (_config_dtype(path) if os.path.isfile(os.path.join(path, "config.json"))
              else None)
    if dtype is None:
        dtype = stored or _first_float_dtype(files, infos)
    model = cls(cfg, device="meta")
    params = dict(model.named_parameters())
    expected = {to_original_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, shapes, cfg, path)
    wrong = sorted(f"{k} in {infos[k][2]!r}" for k in expected
                   if infos[k][1] != "f" and from_original_key(k) in params
                   and params[from_original_key(k)].is_floating_point())
    if wrong:
        raise CheckpointError(_listing(f"checkpoint {path!r}: integer / bool / complex tensors "
                                       "for floating-point parameters", wrong))
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
    model.stop_token_ids = stop_token_ids(path, cfg)
    return model.eval()


def _config_dtype(path: str) -> Optional[torch.dtype]:
    """config.json's torch_dtype (None when absent); anything but a float the model runs in is
    refused."""
    from .config import MODEL_DTYPES

    data = read_config_json(path)
    field = "torch_dtype" if "torch_dtype" in data else "dtype"   # transformers >= 5: "dtype"
    name = data.get(field)
    if name is None or name == "auto":
        return None
    if name not in MODEL_DTYPES:
        raise CheckpointError(f"checkpoint file {os.path.join(path, 'config.json')!r}: "
                              f"{field}: expected one of {', '.join(MODEL_DTYPES)} (or "
                              f"\"auto\"), got {name!r}")
    return getattr(torch, name)


def _first_float_dtype(files, infos) -> torch.dtype:
    """The dtype of the first floating-point tensor stored (float32 when it is no model dtype,
    e.g. float8)."""
    for _, value in iter_tensors(files):
        if value.is_floating_point():
            if value.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                return value.dtype
            return torch.float32
    return torch.float32


# ---------------------------------------------------------------------------- stop tokens
def _tokenizer_token_id(path: str, token: str) -> Optional[int]:
    """The id of ``token`` in the checkpoint's tokenizer files (tokenizer.json's added tokens
    and vocabulary, or added_tokens.json as the original release ships), read as JSON only."""
    for name in ("tokenizer.json", "added_tokens.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        data = _read_json(file)
        if not isinstance(data, dict):
            continue
        if name == "added_tokens.json":
            tid = data.get(token)
            if isinstance(tid, int) and not isinstance(tid, bool):
                return tid
            continue
        for entry in data.get("added_tokens") or []:
            if isinstance(entry, dict) and entry.get("content") == token:
                tid = entry.get("id")
                if isinstance(tid, int) and not isinstance(tid, bool):
                    return tid
        vocab = (data.get("model") or {}).get("vocab") if isinstance(data.get("model"),
                                                                      dict) else None
        if isinstance(vocab, dict) and isinstance(vocab.get(token), int):
            return vocab[token]
    return None


def generation_config_eos(path: str) -> List[int]:
    """eos_token_id of the checkpoint's generation_config.json (an int or a list), or []."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return []
    data = _read_json_object(file, "a JSON object")
    eos = data.get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"checkpoint file {file!r}: eos_token_id: expected an int >= 0 or "
                              f"a list of them, got {eos!r}")
    return ids


def stop_token_ids(path: str, config: FlashSlothConfig, tokenizer=None) -> Tuple[int, ...]:
    """Where generation stops for a checkpoint, as the original release: the config's eos
    (<|endoftext|>), the "</s>" the released fine-tune ends every answer with (when the
    tokenizer, given or in the folder, has it) and any generation_config.json eos_token_id."""
    ids: List[int] = []
    if config.text.eos_token_id is not None:
        ids.append(config.text.eos_token_id)
    ids += generation_config_eos(path)
    end = tokenizer.token_to_id("</s>") if tokenizer is not None else None
    if end is None:
        end = _tokenizer_token_id(path, "</s>")
    if end is not None:
        ids.append(end)
    vocab = config.text.vocab_size
    return tuple(dict.fromkeys(i for i in ids if 0 <= i < vocab))


# ---------------------------------------------------------------------------- saving
_OWN_FILES = re.compile(r"(config\.json|model\.safetensors|model-\d+-of-\d+\.safetensors|"
                        r"model\.safetensors\.index\.json|pytorch_model.*\.bin|"
                        r"pytorch_model\.bin\.index\.json)$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False when the
    platform or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def save_pretrained(model, path: str, *, max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write config.json and model.safetensors (or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json above ``max_shard_bytes``) with the original key names.

    The save is atomic: everything is written to a hidden folder beside ``path``, flushed, and
    swapped in with one rename (an atomic exchange with the old folder on Linux). The folder's
    previous weights, index and config never mix with the new ones; its other files
    (tokenizer, generation_config.json, ...) are carried over. A killed save leaves ``path``
    as it was, plus at most a hidden ``.NAME.saving-*`` folder beside it.
    """
    from safetensors.torch import save_file

    if (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
            or max_shard_bytes < 1):
        raise ValueError(f"max_shard_bytes: expected an int >= 1, got {max_shard_bytes!r}")
    state = {to_original_key(k): v.detach() for k, v in model.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise ValueError("save_pretrained: the model is on the meta device (no weights to save)")
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"save_pretrained: {path!r} exists and is not a directory")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    import tempfile

    need = sum(t.numel() * t.element_size() for t in state.values())
    free = shutil.disk_usage(parent).free
    if need > free:       # the old checkpoint stays until the new one is complete: a full copy
        raise OSError(errno.ENOSPC, f"save_pretrained: {path!r} needs {need / 2**20:.1f} MiB "
                                    f"for the weights, {free / 2**20:.1f} MiB free on its file "
                                    "system (the previous checkpoint is left as it was)")
    tmp = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        try:
            _write_weights(state, tmp, max_shard_bytes, save_file)
        except OSError:
            raise
        except Exception as exc:   # safetensors reports I/O errors (a full disk) as its own
            raise OSError(f"save_pretrained: writing the weights of {path!r} into {tmp!r} "
                          f"failed ({type(exc).__name__}: {exc}); the previous checkpoint is "
                          "left as it was") from exc
        cfg = model.config.to_original_dict()
        cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(cfg, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        subdirs = []
        if os.path.isdir(target):
            # carry the folder's other files over (hard links: no copy, the old folder keeps
            # them until it is removed); sub-folders are moved after the swap
            for entry in os.listdir(target):
                src = os.path.join(target, entry)
                if _OWN_FILES.match(entry):
                    continue
                if os.path.isdir(src) and not os.path.islink(src):
                    subdirs.append(entry)
                    continue
                dst = os.path.join(tmp, entry)
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError:
                    shutil.copy2(src, dst, follow_symlinks=False)
        _fsync_dir(tmp)
        if not os.path.isdir(target):
            os.rename(tmp, target)
            tmp = None
        else:
            old = tmp
            if not _exchange(tmp, target):
                # no atomic exchange: two renames (the folder is absent for an instant)
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.rmdir(old)
                os.rename(target, old)
                os.rename(tmp, target)
            tmp = None
            for entry in subdirs:
                os.rename(os.path.join(old, entry), os.path.join(target, entry))
            shutil.rmtree(old)
        _fsync_dir(parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_weights(state: Dict[str, Tensor], folder: str, max_shard_bytes: int,
                   save_file) -> None:
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
    written = []
    if len(shards) == 1:
        written.append(os.path.join(folder, "model.safetensors"))
        save_file(shards[0], written[-1], metadata={"format": "pt"})
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            shard_name = f"model-{i:05d}-of-{n:05d}.safetensors"
            written.append(os.path.join(folder, shard_name))
            save_file(shard, written[-1], metadata={"format": "pt"})
            weight_map.update({k: shard_name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        written.append(os.path.join(folder, SAFETENSORS_INDEX))
        with open(written[-1], "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    for file in written:
        with open(file, "rb+") as fh:
            os.fsync(fh.fileno())
