"""Serving-grade metrics per preset and compression mode, in vLLM ``bench serve``'s field names.

For every timed preset (``--preset``) and compression mode, the model section runs the same
seeded set of requests (``make_requests``): each a prompt "{32 system tokens} <image>\\n
{question of varied length}<slot>{4 tokens}" with a random image, answered by greedy cached
decoding of a varied number of tokens (no EOS stop, so every mode generates the same
number). Requests run one at a time (concurrency 1, batch 1, no queueing: an offline engine,
not an HTTP server), after one warm-up request; when the modes' models fit in memory
together they take turns request by request (the order rotated), so the noise of a shared
machine hits them alike.

Per request: TTFT (prefill, which includes the vision tower and the compression, plus the
first token's pick), the inter-token latencies of the cached decode steps, and the
end-to-end latency. Per (preset, mode), as vLLM computes them: TPOT = (e2e - TTFT) /
(output tokens - 1) per request with more than one output token; mean / median / std and
p50 / p90 / p99 (linear interpolation, as numpy's percentile) of TTFT, TPOT, ITL and e2e, in
ms; ``duration`` = the summed request latencies (the engine's busy time; requests run back
to back); request_throughput, output_throughput and total_token_throughput per second of it.
``input_lens`` are the prompt's text tokens (the image counts as its one marker, so every
mode has the same), and the visual tokens the LLM sees are reported apart. Not vLLM fields:
``peak_memory_bytes`` (the high-water mark of one call of the longest request, above the
weights) and the ``flashsloth_*`` fields.

Outputs: rows of section "serving" in the suite's JSON / CSV / Markdown, and one JSON file per
(preset, mode) in vLLM's result layout under ``serving/`` of the output folder
(``write_vllm_files``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .common import Row, RunConfig
from .timing import peak_memory_bytes, synchronize

SECTION = "serving"
PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
N_SYSTEM, N_TAIL = 32, 4


@dataclass(frozen=True)
class Request:
    question_tokens: int
    output_tokens: int
    seed: int


@dataclass(frozen=True)
class Workload:
    requests: int
    question: tuple     # (min, max) question tokens
    output: tuple       # (min, max) generated tokens
    seed: int = 0


def workload(preset: str, cfg_run: RunConfig) -> Workload:
    """Requests per (preset, mode): sized so the CPU default run stays short and a 3.2B
    preset on a CPU finishes in minutes per mode."""
    big = preset.startswith("flashsloth-")
    if cfg_run.on_gpu:
        return Workload(8 if cfg_run.quick else 16, (8, 96), (16, 64))
    if big:
        return Workload(3 if cfg_run.quick else 4, (8, 64), (2, 8))
    return Workload(4 if cfg_run.quick else 12, (4, 48), (4, 12) if cfg_run.quick else (4, 32))


def make_requests(w: Workload) -> List[Request]:
    """The seeded request set: uniform question and answer lengths in the workload's ranges."""
    g = torch.Generator().manual_seed(w.seed)
    out = []
    for i in range(w.requests):
        q = int(torch.randint(w.question[0], w.question[1] + 1, (1,), generator=g))
        n = int(torch.randint(w.output[0], w.output[1] + 1, (1,), generator=g))
        out.append(Request(q, n, w.seed * 100003 + i))
    return out


def extra_positions(requests: Sequence[Request], base_question: int) -> int:
    """Positions a request needs beyond a prompt with ``base_question`` question tokens and no
    answer (what the model section's context check counts)."""
    return max([r.question_tokens - base_question + r.output_tokens for r in requests] + [0])


def request_inputs(cfg, req: Request, device, dtype):
    """(input_ids (1, T), pixel values) of one request; T = the text prompt's tokens."""
    g = torch.Generator().manual_seed(req.seed)
    hi = min(cfg.text.vocab_size, 700)   # below every special id of the presets

    def rand(n):
        return torch.randint(3, hi, (1, n), generator=g)

    ids = torch.cat([rand(N_SYSTEM), torch.full((1, 1), cfg.image_token_id), rand(1),
                     rand(req.question_tokens), torch.full((1, 1), cfg.query_token_id),
                     rand(N_TAIL)], 1)
    S, C = cfg.vision.image_size, cfg.vision.num_channels
    shape = (1, cfg.num_views, C, S, S) if cfg.hd else (1, C, S, S)
    px = torch.rand(shape, generator=g) * 2 - 1
    return ids.to(device), px.to(device=device, dtype=dtype)


@dataclass
class Result:
    input_len: int
    output_len: int
    ttft: float          # seconds, as vLLM
    itl: List[float]     # seconds
    latency: float       # seconds


class Server:
    """One mode's model answering requests one at a time."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.results: List[Result] = []
        self.peak: Optional[int] = None

    @torch.no_grad()
    def answer(self, req: Request, record: bool = True) -> Result:
        model = self.model
        ids, px = request_inputs(model.config, req, self.device, model.dtype)
        synchronize(self.device)
        t0 = time.perf_counter()
        logits, cache = model.prefill(px, ids, max_new_tokens=req.output_tokens)
        tok = logits.argmax(-1)
        synchronize(self.device)
        t_first = time.perf_counter()
        itl, last = [], t_first
        for _ in range(req.output_tokens - 1):
            tok = model.decode_step(tok, cache).argmax(-1)
            synchronize(self.device)
            now = time.perf_counter()
            itl.append(now - last)
            last = now
        res = Result(int(ids.shape[1]), req.output_tokens, t_first - t0, itl, last - t0)
        if record:
            self.results.append(res)
        return res

    def measure_peak(self, req: Request) -> None:
        self.peak = peak_memory_bytes(lambda: self.answer(req, record=False), self.device)


def run(servers: Dict[str, Server], requests: Sequence[Request]) -> None:
    """Every request on every server: one warm-up each, then request by request, the modes
    taking turns (order rotated per request); then each mode's peak memory on the longest
    request."""
    names = list(servers)
    for name in names:
        servers[name].answer(requests[0], record=False)
    for i, req in enumerate(requests):
        r = i % max(1, len(names))
        for name in names[r:] + names[:r]:
            servers[name].answer(req)
    longest = max(requests, key=lambda q: (q.question_tokens, q.output_tokens))
    for name in names:
        servers[name].measure_peak(longest)


# ---------------------------------------------------------------- statistics (vLLM's)
def percentile(values: Sequence[float], p: float) -> float:
    """numpy.percentile's default (linear interpolation between closest ranks)."""
    xs = sorted(values)
    if not xs:
        return 0.0
    pos = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _std(xs: Sequence[float]) -> float:
    """Population standard deviation (numpy.std's default)."""
    if not xs:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def metrics(results: Sequence[Result], percentiles: Sequence[float] = PERCENTILES
            ) -> Dict[str, object]:
    """vLLM's benchmark result fields for a list of finished requests."""
    ttft = [r.ttft for r in results]
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in results if r.output_len > 1]
    itl = [x for r in results for x in r.itl]
    e2el = [r.latency for r in results]
    duration = sum(e2el)
    total_in = sum(r.input_len for r in results)
    total_out = sum(r.output_len for r in results)
    out: Dict[str, object] = {
        "duration": duration, "completed": len(results), "failed": 0,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(results) / duration if duration else 0.0,
        "request_goodput": None,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        ms = [x * 1e3 for x in xs]
        out[f"mean_{name}_ms"] = _mean(ms)
        out[f"median_{name}_ms"] = percentile(ms, 50)
        out[f"std_{name}_ms"] = _std(ms)
        for p in percentiles:
            word = str(int(p)) if int(p) == p else str(p)
            out[f"p{word}_{name}_ms"] = percentile(ms, p)
    return out


def vllm_result(row: Row, server: Server, cfg_run: RunConfig) -> Dict[str, object]:
    """One (preset, mode) as vLLM's ``bench serve --save-result`` JSON."""
    res = server.results
    return {
        "date": time.strftime("%Y%m%d-%H%M%S"), "backend": "flashsloth-kernels",
        "model_id": f"{row['preset']}/{row['compression']}", "tokenizer_id": None,
        "num_prompts": len(res), "request_rate": "inf", "burstiness": 1.0,
        "max_concurrency": 1,
        **{k: row[k] for k in row if k in _VLLM_KEYS},
        "input_lens": [r.input_len for r in res], "output_lens": [r.output_len for r in res],
        "ttfts": [r.ttft for r in res], "itls": [r.itl for r in res],
        "generated_texts": [""] * len(res), "errors": [""] * len(res),
        "peak_memory_bytes": server.peak,
        "flashsloth_preset": row["preset"], "flashsloth_compression": row["compression"],
        "flashsloth_visual_tokens": row.get("visual_tokens"),
        "flashsloth_device": str(cfg_run.device), "flashsloth_dtype": cfg_run.dtype_name,
    }


_VLLM_KEYS = set(metrics([Result(1, 2, 0.1, [0.1], 0.2)]))


def rows_for(preset: str, servers: Dict[str, Server], cfg_run: RunConfig,
             visual_tokens: Dict[str, int]) -> List[Row]:
    """One "serving" row per mode (the vLLM fields plus preset, mode, peak memory) and the
    per-request lists kept aside for the vLLM files."""
    rows = []
    for name, server in servers.items():
        if not server.results:
            continue
        row: Row = {"section": SECTION, "case": f"{preset}/{name}", "provider": "-",
                    "mode": "requests", "status": "ok", "preset": preset, "compression": name,
                    "dtype": cfg_run.dtype_name, "visual_tokens": visual_tokens.get(name),
                    **metrics(server.results), "peak_mem_bytes": server.peak}
        row["_vllm"] = vllm_result(row, server, cfg_run)
        rows.append(row)
    return rows


def write_vllm_files(out_dir: Path, rows: List[Row]) -> List[Path]:
    """serving/<preset>__<mode>.json in vLLM's result layout, one per row that carries one
    (its private ``_vllm`` key, which the suite's own JSON / CSV leave out); each written to a
    temporary name and renamed into place."""
    written = []
    for r in rows:
        data = r.get("_vllm")
        if data is None:
            continue
        folder = out_dir / "serving"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{r['preset']}__{r['compression']}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
        written.append(path)
    return written
