"""``--compare OLD.json``: the change of every matching number against an earlier run.

Rows match on their identity (section, case, mode, provider, preset, compression, stage,
dtype and the sweep parameters); each metric is printed old -> new with its change. Times
and rates move with the load of a shared machine; the ratios taken within each run
(ratio_to_floor, fused_speedup) are the numbers to compare. Timings from different devices
are not comparable; the output says when the devices differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .common import Row

_IDENTITY = ("section", "case", "mode", "provider", "preset", "compression", "stage", "dtype",
             "B", "Lk")
# metric -> True when larger is better
METRICS: Dict[str, bool] = {
    "median_ms": False, "gflops": True, "gbps": True, "peak_mem_bytes": False,
    # ratios taken within one run: what survives a noisy shared machine
    "ratio_to_floor": False, "fused_speedup": True,
    "visual_tokens": False, "prefill_flops": False, "kv_cache_bytes": False, "prefill_ms": False,
    "decode_tok_s": True, "step_ms": False, "params": False,
}


class CompareError(ValueError):
    """A --compare file that is missing or not a flashsloth-bench results.json; the message
    names the file and is one line."""


def load(path: str | Path) -> Dict[str, object]:
    """A results.json written by flashsloth-bench, checked: missing, unreadable, binary,
    corrupt or wrongly shaped files raise CompareError naming the file."""
    p = Path(path)
    if not p.exists():
        raise CompareError(f"--compare: {p}: no such file (expected a results.json)")
    if not p.is_file():
        raise CompareError(f"--compare: {p} is not a file (expected a results.json)")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise CompareError(f"--compare: {p}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise CompareError(f"--compare: {p} is a binary file, not a results.json") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CompareError(f"--compare: {p} is not valid JSON (line {exc.lineno}, column "
                           f"{exc.colno}: {exc.msg})") from None
    what = "is not a flashsloth-bench results.json"
    if not isinstance(data, dict):
        raise CompareError(f"--compare: {p} {what} (a JSON {type(data).__name__}, expected an "
                           "object)")
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise CompareError(f"--compare: {p} {what} (no list of 'rows')")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise CompareError(f"--compare: {p} {what} (rows[{bad[0]}] is a "
                           f"{type(rows[bad[0]]).__name__}, expected an object)")
    if not isinstance(data.get("context", {}), (dict, type(None))):
        raise CompareError(f"--compare: {p} {what} ('context' is a "
                           f"{type(data['context']).__name__}, expected an object)")
    return data


def _key(r: Row) -> Tuple:
    return tuple(r.get(k) for k in _IDENTITY)


def diff(old: Dict[str, object], new: Dict[str, object]) -> List[Dict[str, object]]:
    """One entry per (row, metric) present and numeric in both runs."""
    old_rows = {_key(r): r for r in old["rows"] if r.get("status") == "ok"}
    out: List[Dict[str, object]] = []
    for r in new["rows"]:
        if r.get("status") != "ok":
            continue
        o = old_rows.get(_key(r))
        if o is None:
            continue
        for m, higher_better in METRICS.items():
            a, b = o.get(m), r.get(m)
            if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a == 0:
                continue
            change = 100.0 * (b - a) / a
            better = (change > 0) == higher_better if change != 0 else None
            out.append({"row": " ".join(str(r.get(k)) for k in ("section", "case", "mode",
                                                                  "provider", "preset",
                                                                  "compression", "stage")
                                        if r.get(k) not in (None, "-")),
                        "metric": m, "old": a, "new": b, "change_pct": change, "better": better})
    return out


def device_note(old: Dict[str, object], new: Dict[str, object]) -> Optional[str]:
    a = (old.get("context") or {}).get("device_description")
    b = (new.get("context") or {}).get("device_description")
    if a != b:
        return f"devices differ: {a} -> {b}; timings are not comparable"
    return None


def print_diff(console, old: Dict[str, object], new: Dict[str, object], old_name: str,
               threshold_pct: float = 0.0) -> List[Dict[str, object]]:
    from rich.table import Table

    from .report import fmt

    changes = diff(old, new)
    octx = old.get("context") or {}
    table = Table(title=f"change against {old_name} ({octx.get('date')}, "
                        f"commit {str(octx.get('git_commit'))[:10]})")
    for col in ("row", "metric", "old", "new", "change"):
        table.add_column(col, justify="right" if col in ("old", "new", "change") else "left")
    for c in changes:
        if abs(c["change_pct"]) < threshold_pct:
            continue
        style = "" if c["better"] is None else ("green" if c["better"] else "red")
        table.add_row(c["row"], c["metric"], fmt(c["old"]), fmt(c["new"]),
                      f"[{style}]{c['change_pct']:+.1f}%[/{style}]" if style
                      else f"{c['change_pct']:+.1f}%")
    note = device_note(old, new)
    if note:
        console.print(f"[yellow]{note}[/yellow]")
    if not changes:
        console.print("no rows in common with the earlier run")
    else:
        console.print(table)
    return changes
