"""Outputs of a run: results.json (every number with its context), results.csv, report.md and
four PNG plots drawn from the same rows (speedup.png, latency.png, model.png, serving.png), and
the serving rows' vLLM-layout files (serving/<preset>__<mode>.json).

Also the console tables. Everything here reads rows; nothing here measures.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .common import Row

SCHEMA_VERSION = 1

# Columns first in the CSV (the rest follow alphabetically)
_LEAD = ["section", "case", "mode", "provider", "status", "dtype", "B", "Lk", "preset",
         "compression", "stage", "backend", "median_ms", "q25_ms", "q75_ms", "spread_pct",
         "gflops", "gbps", "pct_matmul_ceiling", "pct_copy_ceiling", "ratio_to_floor",
         "fused_speedup", "peak_mem_bytes", "note"]

PLOTS = ("speedup.png", "latency.png", "model.png", "serving.png")


def payload(context: Dict[str, object], ceilings: Optional[Dict[str, object]], rows: List[Row],
            bars: List[Dict[str, object]]) -> Dict[str, object]:
    return {"schema": SCHEMA_VERSION, "context": context, "ceilings": ceilings, "bars": bars,
            "rows": rows}


def write_all(out_dir: Path, data: Dict[str, object]) -> List[Path]:
    """Write every output into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(out_dir / "results.json", data), write_csv(out_dir / "results.csv",
                                                                     data["rows"])]
    plots = write_plots(out_dir, data["rows"], data["context"])
    written.append(write_markdown(out_dir / "report.md", data, [p.name for p in plots]))
    return written + plots


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _atomic_text(path: Path, text: str, newline: Optional[str] = None) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename it into place, so an
    interrupted run never leaves a half-written result file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline=newline) as f:
        f.write(text)
    tmp.replace(path)


def _public(r: Row) -> Row:
    """A row without its private keys ("_..."; e.g. the serving rows' per-request lists)."""
    return {k: v for k, v in r.items() if not k.startswith("_")}


def write_json(path: Path, data: Dict[str, object]) -> Path:
    """results.json; serving rows also get their vLLM-layout files in serving/ beside it."""
    from .serving import write_vllm_files

    write_vllm_files(path.parent, data["rows"])
    rows = [{k: _clean(v) for k, v in _public(r).items()} for r in data["rows"]]
    _atomic_text(path, json.dumps({**data, "rows": rows}, indent=1, default=str) + "\n")
    return path


def write_partial(path: Path, data: Dict[str, object]) -> Path:
    """results.json of an unfinished run (context.complete false), rewritten atomically after
    every case; the run's full outputs replace it at the end."""
    rows = [{k: _clean(v) for k, v in _public(r).items()} for r in data["rows"]]
    _atomic_text(path, json.dumps({**data, "rows": rows}, indent=1, default=str) + "\n")
    return path


def write_csv(path: Path, rows: List[Row]) -> Path:
    rows = [_public(r) for r in rows]
    keys = {k for r in rows for k in r}
    cols = [k for k in _LEAD if k in keys] + sorted(keys - set(_LEAD))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _clean(r.get(k)) for k in cols})
    _atomic_text(path, buf.getvalue(), newline="")
    return path


# ---------------------------------------------------------------- formatting helpers
def fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_bytes(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "-"


def fmt_count(v) -> str:
    """1234567 -> 1.23M; FLOPs and parameter counts."""
    if v is None:
        return "-"
    v = float(v)
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{v:+.1f}%"


# ---------------------------------------------------------------- tables (shared by console + md)
def op_table(rows: List[Row], section: str) -> Optional[Dict[str, object]]:
    sel = [r for r in rows if r.get("section") == section]
    if not sel:
        return None
    rate_col = "GB/s" if any(r.get("gbps") for r in sel) else "GFLOP/s"
    header = ["case", "mode", "provider", "backend", "median ms", "IQR %", rate_col,
              "% ceiling", "x floor", "fused faster by", "peak mem", "status"]
    body = []
    for r in sel:
        if rate_col == "GB/s" and r.get("gbps") is not None:
            rate, pct = fmt(r.get("gbps")), r.get("pct_copy_ceiling")
        else:
            rate, pct = fmt(r.get("gflops")), r.get("pct_matmul_ceiling")
        status = r.get("status", "")
        if status != "ok":
            status = f"{status}: {r.get('note', '')}"
        body.append([r.get("case", ""), r.get("mode", ""), r.get("provider", ""),
                     r.get("backend") or "-", fmt(r.get("median_ms")),
                     fmt(r.get("spread_pct"), 2), rate, "-" if pct is None else f"{pct:.0f}%",
                     fmt(r.get("ratio_to_floor")), fmt(r.get("fused_speedup")),
                     fmt_bytes(r.get("peak_mem_bytes")), status])
    return {"title": section, "header": header, "rows": body}


def model_table(rows: List[Row]) -> Optional[Dict[str, object]]:
    sel = [r for r in rows if r.get("section") == "model"]
    if not sel:
        return None
    header = ["preset", "compression", "visual tokens", "params", "weights", "prefill FLOPs",
              "KV cache", "peak mem", "prefill ms", "decode tok/s", "tokens vs none",
              "FLOPs vs none", "KV vs none", "mem vs none", "prefill vs none", "decode vs none",
              "status"]
    body = []
    for r in sel:
        status = r.get("status", "")
        if status != "ok":
            status = f"{status}: {r.get('note', '')}"
        elif r.get("note"):
            status = f"ok ({r['note']})"
        tokens = fmt(r.get("visual_tokens"))
        kept = r.get("visual_tokens_kept")
        if kept is not None and kept != r.get("visual_tokens"):
            tokens = f"{tokens} -> {fmt(kept)}"        # fastv: all enter, fewer stay
        body.append([r.get("preset", ""), r.get("compression", ""), tokens,
                     fmt_count(r.get("params")), fmt_bytes(r.get("weights_bytes")),
                     fmt_count(r.get("prefill_flops")),
                     fmt_bytes(r.get("kv_cache_bytes")), fmt_bytes(r.get("peak_mem_bytes")),
                     fmt(r.get("prefill_ms")), fmt(r.get("decode_tok_s")),
                     fmt_pct(r.get("visual_tokens_reduction_pct")),
                     fmt_pct(r.get("prefill_flops_reduction_pct")),
                     fmt_pct(r.get("kv_cache_bytes_reduction_pct")),
                     fmt_pct(r.get("peak_mem_bytes_reduction_pct")),
                     fmt_pct(r.get("prefill_ms_reduction_pct")),
                     "-" if r.get("decode_speedup") is None else f"{r['decode_speedup']:.2f}x",
                     status])
    return {"title": "model", "header": header, "rows": body,
            "caption": "counts (tokens, params, FLOPs, KV cache) for every preset, on the meta "
                       "device; peak mem (above the weights), prefill and decode measured for "
                       "the timed presets only (--preset); reductions: 100 * (1 - mode / none), "
                       "decode: tokens/s relative to none"}


def train_table(rows: List[Row]) -> Optional[Dict[str, object]]:
    sel = [r for r in rows if r.get("section") == "train"]
    if not sel:
        return None
    header = ["preset", "stage", "compression", "trained", "trainable params", "weights + optim",
              "step peak", "peak mem", "step ms", "mem vs none", "step", "status"]
    body = []
    for r in sel:
        status = r.get("status", "")
        if status != "ok":
            status = f"{status}: {r.get('note', '')}"
        elif r.get("note"):
            status = f"ok ({r['note']})"
        fixed = None
        if r.get("weights_bytes") is not None:
            fixed = r["weights_bytes"] + (r.get("optimizer_state_bytes") or 0)
        body.append([r.get("preset", ""), r.get("stage", ""), r.get("compression", ""),
                     r.get("trained_modules") or "-", fmt_count(r.get("trainable_params")),
                     fmt_bytes(fixed), fmt_bytes(r.get("step_peak_bytes")),
                     fmt_bytes(r.get("peak_mem_bytes")), fmt(r.get("step_ms")),
                     fmt_pct(r.get("peak_mem_bytes_reduction_pct")), r.get("step_impl") or "-",
                     status])
    return {"title": "train", "header": header, "rows": body,
            "caption": "peak mem = weights + optimizer state + the step's own high-water mark "
                       "(activations, gradients, temporaries); reduction against none"}


def serving_table(rows: List[Row]) -> Optional[Dict[str, object]]:
    sel = [r for r in rows if r.get("section") == "serving"]
    if not sel:
        return None
    header = ["preset", "compression", "visual tokens", "requests", "TTFT p50 / p90 / p99 ms",
              "TPOT p50 / p90 / p99 ms", "e2e p50 / p90 / p99 ms", "req/s", "out tok/s",
              "peak mem", "status"]
    body = []

    def p3(r, name):
        vals = [r.get(f"p{p}_{name}_ms") for p in (50, 90, 99)]
        return " / ".join(fmt(v) for v in vals) if None not in vals else "-"

    for r in sel:
        status = r.get("status", "")
        if status != "ok":
            status = f"{status}: {r.get('note', '')}"
        body.append([r.get("preset", ""), r.get("compression", ""), fmt(r.get("visual_tokens")),
                     fmt(r.get("completed")), p3(r, "ttft"), p3(r, "tpot"), p3(r, "e2el"),
                     fmt(r.get("request_throughput")), fmt(r.get("output_throughput")),
                     fmt_bytes(r.get("peak_mem_bytes")), status])
    return {"title": "serving", "header": header, "rows": body,
            "caption": "measured: a seeded set of requests with varied prompt and answer "
                       "lengths, one at a time (batch 1), greedy cached decoding; TTFT = "
                       "prefill (vision tower and compression included) + first token; TPOT = "
                       "(e2e - TTFT) / (output tokens - 1); throughput per second of summed "
                       "request time; peak mem: the longest request, above the weights. "
                       "vLLM-layout JSON per row in serving/"}


def bars_table(bars: List[Dict[str, object]]) -> Optional[Dict[str, object]]:
    if not bars:
        return None
    body = [[b["bar"], b["target"], fmt(b.get("measured")), b["status"], b.get("note") or ""]
            for b in bars]
    return {"title": "bars (from the op issues)", "header": ["bar", "target", "measured",
                                                             "verdict", "note"], "rows": body}


def all_tables(rows: List[Row], bars: List[Dict[str, object]]) -> List[Dict[str, object]]:
    tables = [op_table(rows, "ops/sap"), op_table(rows, "ops/attention"), model_table(rows),
              serving_table(rows), train_table(rows), bars_table(bars)]
    other = sorted({r.get("section") for r in rows} - {"ops/sap", "ops/attention", "model",
                                                         "serving", "train"})
    for sec in other:  # a section that failed as a whole: its status rows
        sel = [r for r in rows if r.get("section") == sec]
        tables.append({"title": str(sec), "header": ["case", "status", "note"],
                       "rows": [[r.get("case", ""), r.get("status", ""), r.get("note", "")]
                                for r in sel]})
    return [t for t in tables if t]


# ---------------------------------------------------------------- markdown
def _md_table(t: Dict[str, object]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in t["rows"]]
    return "\n".join(lines)


def write_markdown(path: Path, data: Dict[str, object], plots: Sequence[str]) -> Path:
    ctx = data["context"]
    ceil = data.get("ceilings") or {}
    cfg = ctx.get("config", {})
    lines = [f"# flashsloth-bench results: {ctx.get('device_description')}", ""]
    lines.append(f"- device: `{ctx.get('device')}` ({ctx.get('device_description')})")
    lines.append(f"- torch {ctx.get('torch')}, triton {ctx.get('triton')}, "
                 f"python {ctx.get('python')}")
    commit = ctx.get("git_commit") or "unknown"
    dirty = " (working tree modified)" if ctx.get("git_dirty") else ""
    lines.append(f"- commit `{commit}`{dirty}, {ctx.get('date')}")
    lines.append(f"- config: {json.dumps(cfg, default=str)}")
    if ceil:
        lines.append(f"- ceilings measured in this run: copy {ceil.get('copy_gbps', 0):.1f} GB/s, "
                     f"matmul {ceil.get('matmul_gflops', 0):.0f} GFLOP/s "
                     f"({ceil.get('matmul_dtype')}, n = {ceil.get('matmul_n')})")
    lines += ["", "Times are medians of interleaved samples (IQR: inter-quartile range over the "
              "median); `x floor` is the time over the case's floor (SAP: the bare scorer GEMM, "
              "forward; attention: its bytes at the copy bandwidth); `fused faster by` is the "
              "provider's time over the fused op's. FLOPs come from FlopCounterMode.", ""]
    for t in all_tables(data["rows"], data.get("bars") or []):
        lines += [f"## {t['title']}", ""]
        if t.get("caption"):
            lines += [f"_{t['caption']}_", ""]
        lines += [_md_table(t), ""]
    if plots:
        lines += ["## plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
        lines.append("")
    _atomic_text(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------- plots
def write_plots(out_dir: Path, rows: List[Row], ctx: Dict[str, object]) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    written: List[Path] = []
    title = f"{ctx.get('device')} · {ctx.get('config', {}).get('dtype')}"
    for name, fn in (("speedup.png", _plot_speedup), ("latency.png", _plot_latency),
                     ("model.png", _plot_model), ("serving.png", _plot_serving)):
        fig = fn(plt, rows, title)
        if fig is None:
            continue
        path = out_dir / name
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        tmp.replace(path)
        plt.close(fig)
        written.append(path)
    return written


def _ok(rows: Iterable[Row], section: str) -> List[Row]:
    return [r for r in rows if r.get("section") == section and r.get("status") == "ok"]


def _op_sections(rows) -> List[str]:
    return [s for s in ("ops/sap", "ops/attention") if _ok(rows, s)]


def _plot_speedup(plt, rows, title):
    """Per op: how many times faster the fused op is than each provider, per case."""
    secs = _op_sections(rows)
    if not secs:
        return None
    fig, axes = plt.subplots(len(secs), 1, figsize=(11, 3.8 * len(secs)), squeeze=False)
    for ax, sec in zip(axes[:, 0], secs):
        sel = [r for r in _ok(rows, sec) if r.get("fused_speedup") is not None
               and r["provider"] != "fused"]
        cases = list(dict.fromkeys(f"{r['case']}\n{r['mode']}" for r in sel))
        provs = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            xs, ys = [], []
            for j, c in enumerate(cases):
                for r in sel:
                    if r["provider"] == p and f"{r['case']}\n{r['mode']}" == c:
                        xs.append(j + i * width)
                        ys.append(r["fused_speedup"])
            ax.bar(xs, ys, width=width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=7)
        ax.set_ylabel("provider time / fused time")
        ax.set_title(f"{sec}: fused speedup over each provider (>1: fused faster) · {title}")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def _plot_latency(plt, rows, title):
    """Per op and mode: median time against batch size, one line per provider."""
    panels = []
    for sec in _op_sections(rows):
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in _ok(rows, sec) if r.get("mode") == mode and r.get("B") is not None]
            # one panel per key count (attention sweeps Lk = 729 and the HD 3645)
            for lk in dict.fromkeys(r.get("Lk") for r in sel):
                part = [r for r in sel if r.get("Lk") == lk]
                label = mode if lk is None else f"{mode} Lk={lk}"
                panels.append((sec, label, part))
    if not panels:
        return None
    ncol = 2
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(11, 3.8 * nrow), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (sec, mode, sel) in zip(axes.flat, panels):
        groups = {}
        for r in sel:
            groups.setdefault(r["provider"], []).append((r["B"], r["median_ms"]))
        for label, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch B")
        ax.set_ylabel("median ms")
        ax.set_title(f"{sec} {mode} · {title}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def _plot_model(plt, rows, title):
    """Visual tokens and prefill FLOPs per compression mode, one group per preset."""
    sel = [r for r in rows if r.get("section") == "model" and r.get("visual_tokens") is not None]
    if not sel:
        return None
    presets = list(dict.fromkeys(r["preset"] for r in sel))
    modes = [m for m in ("none", "avgpool", "sap", "flashsloth", "visionzip", "fastv",
                         "random", "downsample") if any(r["compression"] == m for r in sel)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(modes))
    for ax, key, label in ((axes[0], "visual_tokens", "visual tokens into the LLM"),
                           (axes[1], "prefill_flops", "prefill FLOPs")):
        for i, m in enumerate(modes):
            xs, ys = [], []
            for j, p in enumerate(presets):
                r = next((r for r in sel if r["preset"] == p and r["compression"] == m), None)
                if r is not None and r.get(key):
                    xs.append(j + i * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width=width, label=m)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(presets))])
        ax.set_xticklabels(presets, fontsize=7)
        ax.set_title(f"{label} · {title}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_serving(plt, rows, title):
    """Per preset: TTFT and TPOT per compression mode, bar = median, whisker to p90, dot at
    p99 (measured times)."""
    sel = [r for r in _ok(rows, "serving") if r.get("median_ttft_ms") is not None]
    if not sel:
        return None
    presets = list(dict.fromkeys(r["preset"] for r in sel))
    fig, axes = plt.subplots(len(presets), 2, figsize=(11, 3.6 * len(presets)), squeeze=False)
    for row_axes, preset in zip(axes, presets, strict=True):
        part = [r for r in sel if r["preset"] == preset]
        names = [r["compression"] for r in part]
        for ax, metric, label in ((row_axes[0], "ttft", "TTFT (prefill + first token)"),
                                  (row_axes[1], "tpot", "TPOT (per output token)")):
            med = [r[f"median_{metric}_ms"] for r in part]
            p90 = [r.get(f"p90_{metric}_ms") or m for r, m in zip(part, med, strict=True)]
            p99 = [r.get(f"p99_{metric}_ms") or m for r, m in zip(part, med, strict=True)]
            xs = list(range(len(part)))
            colors = ["#d62728" if n == "flashsloth" else "#7f7f7f" if n == "none"
                      else "#1f77b4" for n in names]
            ax.bar(xs, med, color=colors)
            ax.errorbar(xs, med, yerr=[[0] * len(xs),
                                       [b - a for a, b in zip(med, p90, strict=True)]],
                        fmt="none", ecolor="k", capsize=3)
            ax.plot(xs, p99, "k.", label="p99")
            ax.set_xticks(xs)
            ax.set_xticklabels(names, fontsize=7, rotation=30)
            ax.set_ylabel("ms")
            ax.set_title(f"{preset}: {label}, median (bar), p90 (whisker) · {title}",
                         fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
