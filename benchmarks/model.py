"""Model efficiency on the paper's axes, per compression mode (none, avgpool, sap, flashsloth).

For every preset and mode (counted on the meta device, so the 3.2B presets cost nothing):
  visual_tokens    positions of the LLM sequence that are not text (image tokens + queries),
                   counted in the layout the model builds for the benchmark prompt
  params           parameters of the model built for that mode
  prefill_flops    FlopCounterMode over the prefill (vision tower, pooling, projector, EmbQ
                   through the ops' registered formulas, 32 decoder layers, lm_head on the last
                   position); SDPA pinned to its math backend so the counter sees it
  kv_cache_bytes   bytes of the keys and values the prefill leaves in the KV cache
  weights_bytes    bytes of the parameters in the run's dtype
For the presets timed on this device (--preset; default: "tiny" and "tiny-27" on CPU, the
3.2B presets on GPU), also measured on real tensors:
  prefill_ms       median prefill latency (batch 1, sequence as above)
  decode_tok_s     greedy cached decoding after that prefill, tokens per second
  peak_mem_bytes   high-water mark of memory during prefill + decode, above the weights
Each number gets its reduction against "none" of the same preset: 100 * (1 - mode / none)
(decode: a speedup, mode / none).

Presets: the model package's ("tiny", "flashsloth-3.2b", "flashsloth-hd-3.2b") plus "tiny-27":
the tiny widths at the original 27 x 27 patch grid (378 px), so that on a CPU the token
counts of the modes are the paper's (729 / 81 / 90) while a prefill takes milliseconds.

The benchmark prompt is "{32 system tokens} <image>\\n{16 question tokens}<slot>{4 tokens}",
batch 1, with random token ids (fixed seed).
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Tuple

import torch

from .common import Case, Row, RunConfig, error_row, free_memory, status_row
from .flops import count_flops_by_op
from .timing import _quartiles, peak_memory_bytes, synchronize

SECTION = "model"
COMPRESSIONS = ("none", "avgpool", "sap", "flashsloth")
MODEL_PRESETS = ("tiny", "flashsloth-3.2b", "flashsloth-hd-3.2b")
# benchmark-local presets: (model preset, overrides)
LOCAL_PRESETS: Dict[str, Tuple[str, Dict[str, object]]] = {
    "tiny-27": ("tiny", {"vision": {"image_size": 378}}),
}
ALL_PRESETS = ("tiny", "tiny-27", "flashsloth-3.2b", "flashsloth-hd-3.2b")
N_SYSTEM, N_QUESTION, N_TAIL = 32, 16, 4


def default_presets(cfg: RunConfig) -> List[str]:
    if cfg.presets is not None:
        return list(cfg.presets)
    if cfg.on_gpu:
        return ["flashsloth-3.2b"] if cfg.quick else ["flashsloth-3.2b", "flashsloth-hd-3.2b"]
    return ["tiny"] if cfg.quick else ["tiny", "tiny-27"]


def model_config(preset: str, compression: str, extra_positions: int = 0):
    """(FlashSlothConfig, note). The context is raised when the prompt would not fit (HD with
    no compression: 3645 visual tokens against Phi-2's 2048 positions), and the note says so."""
    from flashsloth.config import FlashSlothConfig

    base, overrides = LOCAL_PRESETS.get(preset, (preset, {}))
    cfg = FlashSlothConfig.preset(base, compression=compression, **overrides)
    need = prompt_length(cfg) + extra_positions
    ctx = cfg.text.max_position_embeddings
    if need > ctx:
        cfg = FlashSlothConfig.preset(base, compression=compression,
                                      **{**overrides, "text": {"max_position_embeddings": need}})
        return cfg, f"context raised from {ctx} to {need} positions to fit the prompt"
    return cfg, ""


def prompt_ids(cfg, batch: int = 1) -> torch.Tensor:
    """(batch, T) ids: system, image marker, newline, question, query slot, assistant tokens."""
    g = torch.Generator().manual_seed(0)
    hi = min(cfg.text.vocab_size, 700)   # below every special id of the presets (764, 1000, 50295)

    def rand(n):
        return torch.randint(3, hi, (batch, n), generator=g)

    img = torch.full((batch, 1), cfg.image_token_id)
    slot = torch.full((batch, 1), cfg.query_token_id)
    return torch.cat([rand(N_SYSTEM), img, rand(1), rand(N_QUESTION), slot, rand(N_TAIL)], 1)


def prompt_length(cfg) -> int:
    """Positions of the prompt after the image and slot markers are expanded."""
    return (N_SYSTEM + 1 + N_QUESTION + N_TAIL + cfg.num_image_tokens
            + (cfg.num_queries if cfg.use_queries else 0))


def pixel_shape(cfg, batch: int = 1) -> Tuple[int, ...]:
    S, C = cfg.vision.image_size, cfg.vision.num_channels
    return (batch, cfg.num_views, C, S, S) if cfg.hd else (batch, C, S, S)


def visual_tokens_in_layout(model, ids: torch.Tensor) -> Tuple[int, int]:
    """(visual positions, sequence length) of the layout the model builds for ``ids``.

    The layout indexes a bank [zero row, B*T text rows, visual rows, query rows]: every
    position pointing past the text rows is a visual or query token.
    """
    layout = model.build_layout(ids.cpu())
    B, T = ids.shape
    return int((layout.index >= 1 + B * T).sum()) // B, layout.length


@contextlib.contextmanager
def _math_sdpa():
    """FlopCounterMode counts CPU flash SDPA as 0 FLOPs; the math backend is counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


# FLOPs of modules already counted, keyed by (structure, input shapes, dtype, device type):
# the vision tower is the same in every compression mode and the decoder layers of a model
# are identical, so each distinct (module, shapes) is counted once per process.
_FLOP_MEMO: Dict[tuple, int] = {}


def _memo_count(key: tuple, fn) -> int:
    if key not in _FLOP_MEMO:
        _FLOP_MEMO[key] = count_flops_by_op(fn)[0]
    return _FLOP_MEMO[key]


def prefill_flops(model, ids: torch.Tensor) -> Dict[str, int]:
    """FLOPs of a prefill of ``ids`` (with one image), on the model's device, meta included.

    The model's own ``prefill`` cannot run on meta tensors (it reads the token ids and the
    masks as data), so this runs the same modules in the same order on tensors of the same
    shapes: the vision tower, pooling and projector (``encode_images``), the decoder layers on
    the expanded sequence (no padding: causal, no mask), EmbQ at the input of ``embq_layer``
    with the real slot and question sizes, and lm_head on the last position. Every number is
    FlopCounterMode's; a module counted once for some input shapes is not counted again for
    the same shapes (the tower across modes, the identical decoder layers).
    tests/test_flops.py checks the total against FlopCounterMode over the real ``prefill``.
    Returns {"total", "vision", "llm"} (vision: tower + pooling + projector; llm: the rest).
    """
    from flashsloth.language import rotary_cos_sin

    cfg = model.config
    dev, dt = model.device, model.dtype
    B = ids.shape[0]
    layout = model.build_layout(ids.cpu())
    L = layout.length
    make = torch.zeros if dev.type != "meta" else torch.empty
    views = B * cfg.num_views
    S, N, Cv = cfg.vision.image_size, cfg.vision.num_patches, cfg.vision.hidden_size
    lm = model.language_model
    tcfg = cfg.text
    sig = (dt, dev.type)
    with _math_sdpa(), torch.no_grad():
        px = make(views, cfg.vision.num_channels, S, S, device=dev, dtype=dt)
        tower = _memo_count(("tower", repr(cfg.vision), views) + sig,
                            lambda: model.vision_tower(px))
        feats = make(views, N, Cv, device=dev, dtype=dt)

        def pool_project():
            pooled = feats if model.pooling is None else model.pooling(feats)
            return model.mm_projector(pooled)

        vision = tower + count_flops_by_op(pool_project)[0]

        h = make(B, L, tcfg.hidden_size, device=dev, dtype=dt)
        pos = torch.arange(L, device=dev)[None].expand(B, L)
        cos, sin = rotary_cos_sin(pos, tcfg.rotary_dim, tcfg.rope_theta, dt)
        llm = 0
        for i, layer in enumerate(lm.layers):
            if model.lqformer is not None and i == cfg.embq_layer - 1:
                n_slots = int(layout.question_mask.any(1).sum())
                if n_slots:
                    Lq = layout.question_index.shape[1]
                    queries = make(n_slots, cfg.num_queries, tcfg.hidden_size, device=dev,
                                   dtype=dt)
                    text = make(n_slots, Lq, tcfg.hidden_size, device=dev, dtype=dt)
                    qmask = torch.ones(n_slots, Lq, dtype=torch.bool, device=dev)
                    image = make(n_slots, cfg.num_views * N, Cv, device=dev, dtype=dt)
                    llm += count_flops_by_op(lambda: model.lqformer(queries, text, qmask,
                                                                    image))[0]
            llm += _memo_count(("decoder-layer", repr(tcfg), B, L) + sig,
                               lambda: layer(h, cos, sin, None, None, i))
        last = make(B, 1, tcfg.hidden_size, device=dev, dtype=dt)
        llm += count_flops_by_op(lambda: lm.lm_head(lm.final_layernorm(last)))[0]
    return {"total": vision + llm, "vision": vision, "llm": llm}


def kv_cache_bytes(model, length: int, batch: int = 1) -> int:
    """Bytes of the keys and values of ``length`` positions, read off a KVCache built for the
    model (on its device: on meta it allocates nothing)."""
    from flashsloth.language import KVCache

    cache = KVCache.for_model(model.language_model, batch, length)
    return int(sum(t[:, :, :length].nbytes for t in cache.k + cache.v))


def _counts(preset: str, compression: str, dtype: torch.dtype) -> Row:
    from flashsloth.model import FlashSloth

    cfg, note = model_config(preset, compression)
    model = FlashSloth(cfg, device="meta", dtype=dtype)
    ids = prompt_ids(cfg)
    vis, L = visual_tokens_in_layout(model, ids)
    fl = prefill_flops(model, ids)
    return {"visual_tokens": vis, "seq_len": L, "params": model.num_parameters(),
            "weights_bytes": int(sum(p.nbytes for p in model.parameters())),
            "prefill_flops": fl["total"], "vision_flops": fl["vision"], "llm_flops": fl["llm"],
            "kv_cache_bytes": kv_cache_bytes(model, L), "note": note}


def _latency(preset: str, compression: str, cfg_run: RunConfig) -> Row:
    """Prefill latency, decode tokens/s and peak memory of one model on the run's device."""
    from flashsloth.model import FlashSloth

    n_new = 8 if cfg_run.quick else (64 if cfg_run.on_gpu else 32)
    reps = 3 if cfg_run.quick else 5
    cfg, _ = model_config(preset, compression, extra_positions=n_new)
    dev = cfg_run.device
    torch.manual_seed(0)
    model = FlashSloth(cfg, device=dev, dtype=cfg_run.dtype).eval()
    ids = prompt_ids(cfg).to(dev)
    px = torch.rand(pixel_shape(cfg), device=dev).to(cfg_run.dtype)

    def prefill():
        return model.prefill(px, ids, max_new_tokens=n_new)

    def decode(logits, cache):
        tok = logits.argmax(-1)
        for _ in range(n_new):
            tok = model.decode_step(tok, cache).argmax(-1)
        return tok

    def both():
        logits, cache = prefill()
        return decode(logits, cache)

    both()  # warm-up (lazy init, allocator, first-call dispatch)
    pre_s, dec_s = [], []
    for _ in range(reps):
        synchronize(dev)
        t0 = time.perf_counter()
        logits, cache = prefill()
        synchronize(dev)
        t1 = time.perf_counter()
        decode(logits, cache)
        synchronize(dev)
        pre_s.append(t1 - t0)
        dec_s.append(time.perf_counter() - t1)
        del logits, cache
    _, pre_med, _ = _quartiles([s * 1e3 for s in pre_s])
    q25, _, q75 = _quartiles([s * 1e3 for s in pre_s])
    _, dec_med, _ = _quartiles(dec_s)
    with torch.no_grad():
        peak = peak_memory_bytes(both, dev)
    row: Row = {"prefill_ms": pre_med, "prefill_q25_ms": q25, "prefill_q75_ms": q75,
                "decode_tok_s": n_new / dec_med, "decode_tokens": n_new, "reps": reps,
                "peak_mem_bytes": peak}
    del model
    free_memory(dev)
    return row


def _case(preset: str, compression: str, cfg_run: RunConfig, timed: bool) -> List[Row]:
    base: Row = {"section": SECTION, "case": f"{preset}/{compression}", "provider": "-",
                 "mode": "prefill+decode" if timed else "count", "preset": preset,
                 "compression": compression, "dtype": cfg_run.dtype_name}
    try:
        row = {**base, "status": "ok", **_counts(preset, compression, cfg_run.dtype)}
    except Exception as exc:
        return [{**error_row(SECTION, base["case"], exc), **base, "status": _status(exc),
                 "note": _why(exc)}]
    if timed:
        try:
            row.update(_latency(preset, compression, cfg_run))
        except Exception as exc:
            row["latency_note"] = _why(exc)
            row["note"] = "; ".join(s for s in (row.get("note"), f"latency: {_why(exc)}") if s)
    return [row]


def _status(exc: BaseException) -> str:
    return "not available" if isinstance(exc, (ImportError, AttributeError)) else "error"


def _why(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:240]}"


def cases(cfg: RunConfig) -> List[Case]:
    try:
        import flashsloth.model  # noqa: F401
    except Exception as exc:
        return [Case(SECTION, "model", lambda exc=exc: [status_row(
            SECTION, "model", "not available", f"the flashsloth model package cannot be "
            f"imported: {_why(exc)}")])]
    timed = default_presets(cfg)
    presets = list(ALL_PRESETS) if not cfg.quick else ["tiny", "flashsloth-3.2b"]
    presets += [p for p in timed if p not in presets]
    out: List[Case] = []
    for preset in presets:
        for comp in COMPRESSIONS:
            is_timed = preset in timed
            out.append(Case(SECTION, f"{preset} {comp}" + (" (timed)" if is_timed else ""),
                            lambda p=preset, c=comp, t=is_timed: _case(p, c, cfg, t)))
    return out


_REDUCED = ("visual_tokens", "prefill_flops", "kv_cache_bytes", "peak_mem_bytes", "prefill_ms",
            "params", "weights_bytes")


def finalize(rows: List[Row]) -> None:
    """Add every row's reduction against "none" of the same preset (in place)."""
    none = {r["preset"]: r for r in rows if r.get("section") == SECTION
            and r.get("compression") == "none" and r.get("status") == "ok"}
    for r in rows:
        if r.get("section") != SECTION or r.get("status") != "ok":
            continue
        ref = none.get(r.get("preset"))
        if ref is None:
            continue
        for k in _REDUCED:
            a, b = ref.get(k), r.get(k)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
                r[f"{k}_reduction_pct"] = 100.0 * (1.0 - b / a)
        if r.get("decode_tok_s") and ref.get("decode_tok_s"):
            r["decode_speedup"] = r["decode_tok_s"] / ref["decode_tok_s"]
