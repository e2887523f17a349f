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
                   (the modes of a preset are timed in interleaved rounds when their models
                   fit in memory together)
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
from typing import Dict, List, Optional, Tuple

import torch

from .common import Case, Row, RunConfig, free_memory, status_row
from .flops import count_flops_by_op
from .timing import _quartiles, peak_memory_bytes, synchronize

SECTION = "model"
COMPRESSIONS = ("none", "avgpool", "sap", "flashsloth", "visionzip", "fastv", "random",
                "downsample")
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
    # VisionZip reads the tower's selected-layer attention; FastV drops visual tokens at the
    # input of decoder layer K (shorter sequence L' from there on) after ranking them
    zip_attention = getattr(model.pooling, "needs_attention", False)
    pruner = model.token_pruner
    L_kept = L if pruner is None else model.token_pruning(layout, ids.numel()).length
    with _math_sdpa(), torch.no_grad():
        px = make(views, cfg.vision.num_channels, S, S, device=dev, dtype=dt)
        tower = _memo_count(("tower", repr(cfg.vision), views, zip_attention) + sig,
                            lambda: model.vision_tower(px, return_attention=zip_attention))
        feats = make(views, N, Cv, device=dev, dtype=dt)
        H = cfg.vision.num_attention_heads
        probs = make(views, H, N, N, device=dev, dtype=torch.float32) if zip_attention else None
        keys = make(views, H, N, Cv // H, device=dev, dtype=dt) if zip_attention else None

        def pool_project():
            if zip_attention:
                pooled = model.pooling(feats, probs, keys)
            else:
                pooled = feats if model.pooling is None else model.pooling(feats)
            return model.mm_projector(pooled)

        vision = tower + count_flops_by_op(pool_project)[0]

        h = make(B, L, tcfg.hidden_size, device=dev, dtype=dt)
        pos = torch.arange(L, device=dev)[None].expand(B, L)
        cos, sin = rotary_cos_sin(pos, tcfg.rotary_dim, tcfg.rope_theta, dt)
        llm = 0
        for i, layer in enumerate(lm.layers):
            if pruner is not None and i == pruner.layer:
                from flashsloth.compression import last_token_attention

                mask = torch.ones(B, L, dtype=torch.bool, device=dev)
                last = torch.full((B,), L - 1, dtype=torch.long, device=dev)
                llm += count_flops_by_op(lambda: last_token_attention(
                    lm.layers[i - 1], h, cos, sin, mask, last))[0]
                L = L_kept
                h = make(B, L, tcfg.hidden_size, device=dev, dtype=dt)
                cos, sin = cos[:, :, :L], sin[:, :, :L]
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


def kv_cache_bytes(model, length: int, batch: int = 1, pruned: Optional[tuple] = None) -> int:
    """Bytes of the keys and values of ``length`` positions (``pruned``: (layer, kept length)
    after FastV's pruning), read off a KVCache built for the model to hold exactly that (on
    its device: on meta it allocates nothing)."""
    from flashsloth.language import KVCache

    cache = KVCache.for_model(model.language_model, batch, length, pruned)
    return int(sum(t.nbytes for t in cache.k + cache.v))


def _counts(preset: str, compression: str, dtype: torch.dtype) -> Row:
    from flashsloth.model import FlashSloth

    cfg, note = model_config(preset, compression)
    model = FlashSloth(cfg, device="meta", dtype=dtype)
    ids = prompt_ids(cfg)
    vis, L = visual_tokens_in_layout(model, ids)
    fl = prefill_flops(model, ids)
    pruned = None
    if model.token_pruner is not None:      # fastv: every visual token enters, fewer stay
        plan = model.token_pruning(model.build_layout(ids.cpu()), ids.numel())
        pruned = (plan.layer, plan.length)
    return {"visual_tokens": vis, "visual_tokens_kept": cfg.num_visual_tokens_kept(),
            "seq_len": L, "params": model.num_parameters(),
            "weights_bytes": int(sum(p.nbytes for p in model.parameters())),
            "prefill_flops": fl["total"], "vision_flops": fl["vision"], "llm_flops": fl["llm"],
            "kv_cache_bytes": kv_cache_bytes(model, L, pruned=pruned), "note": note}


def share_weights(model: torch.nn.Module, source: torch.nn.Module) -> int:
    """Make ``model`` use ``source``'s tensors wherever a parameter or buffer has the same name,
    shape and dtype (the vision tower, projector and LLM every mode has), so the models of
    every mode fit in memory together and take turns in the same rounds. Returns the bytes
    no longer held twice. Weights are random here: sharing changes no timing."""
    src = source.state_dict(keep_vars=True)
    mine = model.state_dict(keep_vars=True)
    same = {k: v for k, v in src.items()
            if k in mine and mine[k].shape == v.shape and mine[k].dtype == v.dtype}
    model.load_state_dict(same, strict=False, assign=True)
    return sum(v.nbytes for v in same.values())


class _Timed:
    """One compression mode's model, prompt and timed prefill / decode closures."""

    def __init__(self, preset: str, compression: str, cfg_run: RunConfig, n_new: int,
                 extra_positions: int = 0, share_with: Optional[torch.nn.Module] = None):
        from flashsloth.model import FlashSloth

        cfg, _ = model_config(preset, compression,
                              extra_positions=max(n_new, extra_positions))
        dev = cfg_run.device
        torch.manual_seed(0)
        self.model = FlashSloth(cfg, device=dev, dtype=cfg_run.dtype).eval()
        if share_with is not None:
            share_weights(self.model, share_with)
        self.ids = prompt_ids(cfg).to(dev)
        self.px = torch.rand(pixel_shape(cfg), device=dev).to(cfg_run.dtype)
        self.n_new = n_new
        self.dev = dev
        self.prefill_s: List[float] = []
        self.decode_s: List[float] = []

    def prefill(self):
        return self.model.prefill(self.px, self.ids, max_new_tokens=self.n_new)

    def decode(self, logits, cache):
        tok = logits.argmax(-1)
        for _ in range(self.n_new):
            tok = self.model.decode_step(tok, cache).argmax(-1)
        return tok

    def both(self):
        return self.decode(*self.prefill())

    def sample(self) -> None:
        synchronize(self.dev)
        t0 = time.perf_counter()
        logits, cache = self.prefill()
        synchronize(self.dev)
        t1 = time.perf_counter()
        self.decode(logits, cache)
        synchronize(self.dev)
        self.prefill_s.append(t1 - t0)
        self.decode_s.append(time.perf_counter() - t1)

    def row(self) -> Row:
        q25, med, q75 = _quartiles([s * 1e3 for s in self.prefill_s])
        _, dec_med, _ = _quartiles(self.decode_s)
        with torch.no_grad():
            peak = peak_memory_bytes(self.both, self.dev)
        return {"prefill_ms": med, "prefill_q25_ms": q25, "prefill_q75_ms": q75,
                "decode_tok_s": self.n_new / dec_med, "decode_tokens": self.n_new,
                "reps": len(self.prefill_s), "peak_mem_bytes": peak}


def _available_cpu_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else 2 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2 << 30


def _fits_together(preset: str, cfg_run: RunConfig, n_modes: int) -> bool:
    """Whether the models of every mode fit in memory at once (then they are timed in
    interleaved rounds, so the noise of a shared machine hits every mode alike). The modes
    share their common weights (share_weights), so together they hold about one model; while
    the next one is built, two (its own weights are freed once shared)."""
    from flashsloth.model import FlashSloth

    cfg, _ = model_config(preset, "flashsloth")
    meta = FlashSloth(cfg, device="meta", dtype=cfg_run.dtype)
    one = sum(p.nbytes for p in meta.parameters())
    need = (2 if n_modes > 1 else 1) * one
    if cfg_run.on_gpu:
        free, _ = torch.cuda.mem_get_info(cfg_run.device)
        return need < 0.5 * free
    return need < 0.75 * _available_cpu_bytes()


def _latencies(preset: str, cfg_run: RunConfig) -> Tuple[Dict[str, Row], List[Row]]:
    """Prefill latency, decode tokens/s and peak memory of every mode of ``preset``, and the
    serving rows (benchmarks/serving.py: TTFT / TPOT / e2e over a seeded request set).

    Timed after one warm-up prefill + decode each; when the models fit together, the modes
    take turns (one sample of each per round, the order rotated; the serving requests
    likewise); otherwise one model at a time. A mode that fails gets {"latency_note": why}.
    """
    from . import serving

    big = preset.startswith("flashsloth-")
    # a 3.2B prefill takes seconds and a decode step about one on a CPU: fewer samples and
    # tokens there (the serving rows add decode percentiles)
    big_cpu = big and not cfg_run.on_gpu
    n_new = 8 if cfg_run.quick or big_cpu else (64 if cfg_run.on_gpu else 16)
    reps = 3 if cfg_run.quick or big_cpu else 5
    requests = serving.make_requests(serving.workload(preset, cfg_run))
    out: Dict[str, Row] = {}
    serving_rows: List[Row] = []

    def run_modes(modes: List[str]) -> None:
        live: Dict[str, _Timed] = {}
        for comp in modes:
            try:
                first = next(iter(live.values())).model if live else None
                t = _Timed(preset, comp, cfg_run, n_new,
                           serving.extra_positions(requests, N_QUESTION), share_with=first)
                t.both()  # warm-up (lazy init, allocator, first-call dispatch)
                live[comp] = t
            except Exception as exc:
                out[comp] = {"latency_note": _why(exc)}
        names = list(live)
        for r in range(reps):
            for comp in names[r % max(1, len(names)):] + names[:r % max(1, len(names))]:
                live[comp].sample()
        for comp in names:
            out[comp] = live[comp].row()
        servers = {c: serving.Server(live[c].model, cfg_run.device) for c in names}
        try:
            serving.run(servers, requests)
        except Exception as exc:
            for c in names:
                serving_rows.append({"section": serving.SECTION, "case": f"{preset}/{c}",
                                     "provider": "-", "mode": "requests", "status": "error",
                                     "preset": preset, "compression": c, "note": _why(exc)})
        else:
            serving_rows.extend(serving.rows_for(
                preset, servers, cfg_run,
                {c: live[c].model.config.num_visual_tokens_kept() for c in names}))
        servers.clear()
        live.clear()
        free_memory(cfg_run.device)

    timed = [c for c in COMPRESSIONS if cfg_run.compressions is None or c in cfg_run.compressions]
    if _fits_together(preset, cfg_run, len(timed)):
        run_modes(timed)
    else:
        for comp in timed:
            run_modes([comp])
    for comp in COMPRESSIONS:
        if comp not in timed:
            out[comp] = {"latency_note": "not timed in this run (--compression)"}
    return out, serving_rows


def _preset_case(preset: str, cfg_run: RunConfig, timed: bool) -> List[Row]:
    rows = [_case(preset, comp, cfg_run) for comp in COMPRESSIONS]
    if not timed:
        return rows
    serving_rows: List[Row] = []
    try:
        lat, serving_rows = _latencies(preset, cfg_run)
    except Exception as exc:
        lat = {comp: {"latency_note": _why(exc)} for comp in COMPRESSIONS}
    for row in rows:
        extra = lat.get(row["compression"], {})
        if row["status"] != "ok":
            continue
        row["mode"] = "prefill+decode"
        row.update(extra)
        why = extra.get("latency_note")
        if why:
            row["note"] = "; ".join(s for s in (row.get("note"), f"latency: {why}") if s)
    return rows + serving_rows


def _case(preset: str, compression: str, cfg_run: RunConfig) -> Row:
    base: Row = {"section": SECTION, "case": f"{preset}/{compression}", "provider": "-",
                 "mode": "count", "preset": preset, "compression": compression,
                 "dtype": cfg_run.dtype_name}
    try:
        return {**base, "status": "ok", **_counts(preset, compression, cfg_run.dtype)}
    except Exception as exc:
        return {**base, "status": _status(exc), "note": _why(exc)}


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
    return [Case(SECTION, f"{preset}" + (" (counted, timed)" if preset in timed else " (counted)"),
                 lambda p=preset: _preset_case(p, cfg, p in timed)) for preset in presets]


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
