"""The op issues' speed bars, judged from the rows of this run.

Each bar applies to one device type and dtype (CPU fp32, GPU bf16); a bar whose rows are
missing (not run, a provider not available) is reported as "n/a" with the reason, never as
passed. Ratios are medians measured in the same interleaved rounds.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from .common import Row

Verdict = Dict[str, object]


def _find(rows: Iterable[Row], section: str, mode: str, provider: str, **params) -> Optional[Row]:
    for r in rows:
        if (r.get("section") == section and r.get("mode") == mode and r.get("provider") == provider
                and all(r.get(k) == v for k, v in params.items())):
            return r
    return None


def _ms(row: Optional[Row]) -> Optional[float]:
    if row is None or row.get("status") != "ok":
        return None
    return row.get("median_ms")  # type: ignore[return-value]


def _why_missing(row: Optional[Row], provider: str) -> str:
    if row is None:
        return f"{provider}: not measured in this run"
    return f"{provider}: {row.get('status')} ({row.get('note') or ''})".strip()


def _ratio_bar(rows, name, section, mode, num, den, limit, kind, params) -> Verdict:
    """num / den must be <= limit ("le") or >= limit ("ge")."""
    rn, rd = _find(rows, section, mode, num, **params), _find(rows, section, mode, den, **params)
    tn, td = _ms(rn), _ms(rd)
    v: Verdict = {"bar": name, "target": f"{'<=' if kind == 'le' else '>='} {limit:g}"}
    if tn is None or td is None:
        v.update(status="n/a", measured=None,
                 note="; ".join(_why_missing(r, p) for r, p, t in ((rn, num, tn), (rd, den, td))
                                if t is None))
        return v
    ratio = tn / td
    ok = ratio <= limit if kind == "le" else ratio >= limit
    v.update(status="pass" if ok else "FAIL", measured=round(ratio, 3), note="")
    return v


def _bandwidth_bar(rows, name, section, params, frac, ceiling: str = "copy") -> Verdict:
    """The fused forward moves >= frac of the same-run ``ceiling`` ("copy" or "read") GB/s.
    For "read": against the read reduction timed in the case's own rounds where the case ran
    one (``pct_read_interleaved``, see OpCase.read_provider), the run-start ceiling in the
    note; else against the run-start ceiling."""
    r = _find(rows, section, "fwd", "fused", **params)
    v: Verdict = {"bar": name, "target": f">= {100 * frac:.0f}% of {ceiling} GB/s"}
    ok = r is not None and r.get("status") == "ok"
    start = r.get(f"pct_{ceiling}_ceiling") if ok else None
    inter = r.get("pct_read_interleaved") if ok and ceiling == "read" else None
    pct = inter if inter is not None else start
    if pct is None:
        v.update(status="n/a", measured=None, note=_why_missing(r, "fused"))
        return v
    parts = []
    if inter is not None:
        parts.append(f"read in the case's rounds: {r['read_interleaved_gbps']:.1f} GB/s"
                     + (f"; {start:.0f}% of the run-start ceiling" if start is not None else ""))
    # What the bar asks of the kernel's arithmetic: the time it allows against the case's
    # compute floor (FLOPs at the run's matmul rate). Near 1x, the bar is a compute target
    # whatever the memory does.
    ms, compute = _ms(r), r.get("compute_floor_ms")
    if ms and compute:
        allowed = ms * pct / (100 * frac)
        parts.append(f"allows {allowed:.3g} ms = {allowed / compute:.2f}x the compute floor "
                     f"({compute:.3g} ms at the run's matmul rate)")
    v.update(status="pass" if pct >= 100 * frac else "FAIL", measured=f"{pct:.0f}%",
             note="; ".join(parts))
    return v


def _backend_ratio_bar(rows, name, section, mode, backend, den, limit, params) -> Verdict:
    """Like _ratio_bar for the fused op run on ``backend``: its row is "fused" when auto picked
    that backend, else "fused-<backend>"."""
    row = _find(rows, section, mode, f"fused-{backend}", **params)
    if row is None:
        row = _find(rows, section, mode, "fused", backend=backend, **params)
    num = row.get("provider") if row is not None else f"fused-{backend}"
    return _ratio_bar(rows, name, section, mode, num, den, limit, "le", params)


def _time_bar(rows, name, section, mode, provider, limit_ms, params) -> Verdict:
    """The median time of ``provider`` is at most ``limit_ms``."""
    r = _find(rows, section, mode, provider, **params)
    t = _ms(r)
    v: Verdict = {"bar": name, "target": f"<= {limit_ms * 1e3:g} us"}
    if t is None:
        v.update(status="n/a", measured=None, note=_why_missing(r, provider))
        return v
    v.update(status="pass" if t <= limit_ms else "FAIL", measured=f"{t * 1e3:.1f} us", note="")
    return v


def _model_speedup_bar(rows, preset: str, limit: float) -> Verdict:
    """Prefill of compression "none" over "flashsloth" for ``preset`` (model section rows)."""
    def prefill(comp):
        for r in rows:
            if (r.get("section") == "model" and r.get("preset") == preset
                    and r.get("compression") == comp and r.get("status") == "ok"
                    and r.get("prefill_ms")):
                return r["prefill_ms"]
        return None

    none, fs = prefill("none"), prefill("flashsloth")
    v: Verdict = {"bar": f"{preset} prefill: flashsloth >= {limit:g}x faster than none",
                  "target": f">= {limit:g}"}
    if none is None or fs is None:
        v.update(status="n/a", measured=None, note=f"{preset} prefill of none and flashsloth "
                 "not both timed in this run (--only model, --preset)")
        return v
    ratio = none / fs
    v.update(status="pass" if ratio >= limit else "FAIL", measured=round(ratio, 3), note="")
    return v


def evaluate(rows: List[Row], device_type: str, dtype: str,
             sections: Iterable[str] = ("ops", "model")) -> List[Verdict]:
    """Every bar that applies to this device type and dtype and to the suite sections that
    ran (``sections``), judged from ``rows``."""
    out: List[Verdict] = []
    ran = set(sections)
    sap, att = "ops/sap", "ops/attention"
    if device_type == "cpu" and dtype == "float32" and "ops" in ran:
        for B in (1, 4, 16):
            p = {"B": B}
            out.append(_ratio_bar(rows, f"SAP fwd B={B}: fused <= 1.10x bare GEMM", sap, "fwd",
                                  "fused", "gemm", 1.10, "le", p))
            for other in ("loop", "reference"):
                out.append(_ratio_bar(rows, f"SAP fwd B={B}: fused no slower than {other}", sap,
                                      "fwd", "fused", other, 1.0, "le", p))
        out.append(_ratio_bar(rows, "SAP fwd+bwd B=4: fused <= 4.2x bare (forward) GEMM", sap,
                              "fwd+bwd", "fused", "gemm", 4.2, "le", {"B": 4}))
        # issue 12's attention bars (H = 32, Dk/Dv = 18/36; Lq = 9 unless named)
        for B, Lk in ((16, 729), (4, 3645)):
            out.append(_bandwidth_bar(rows, f"attention fwd B={B} Lk={Lk}: moves >= 60% of read "
                                      "bandwidth", att, {"B": B, "Lk": Lk, "Lq": 9}, 0.60,
                                      ceiling="read"))
        p1 = {"B": 1, "Lk": 729, "Lq": 9}
        p16 = {"B": 16, "Lk": 729, "Lq": 9}
        out.append(_ratio_bar(rows, "attention fwd B=1 Lk=729: >= 2x faster than eager", att,
                              "fwd", "eager", "fused", 2.0, "ge", p1))
        out.append(_ratio_bar(rows, "attention fwd+bwd B=16 Lk=729: >= 1.5x faster than eager",
                              att, "fwd+bwd", "eager", "fused", 1.5, "ge", p16))
        out.append(_ratio_bar(rows, "attention fwd B=16 Lk=729: bf16 faster than fp32", att,
                              "fwd", "fused", "fused-bf16", 1.0, "ge", p16))
        out.append(_ratio_bar(rows, "attention fwd B=16 Lk=729: fp16 no slower than fp32", att,
                              "fwd", "fused", "fused-fp16", 1.0, "ge", p16))
        for r in rows:
            if r.get("section") != att or r.get("mode") != "fwd" or r.get("provider") != "fused":
                continue
            p = {"B": r.get("B"), "Lk": r.get("Lk"), "Lq": r.get("Lq")}
            tag = f"attention fwd B={p['B']} Lk={p['Lk']} Lq={p['Lq']}"
            out.append(_ratio_bar(rows, f"{tag}: no slower than eager", att, "fwd", "eager",
                                  "fused", 1.0, "ge", p))
            out.append(_ratio_bar(rows, f"{tag}: no slower than SDPA", att, "fwd", "sdpa",
                                  "fused", 1.0, "ge", p))
    elif device_type == "cuda" and dtype == "bfloat16":
        # issue 13's GPU bars (H = 32, Lq = 9, Dk/Dv = 18/36; SAP 27x27, C = 1152, window 3)
        p = {"B": 64}
        for backend, limit in (("triton", 1.25), ("cuda", 1.15)):
            out.append(_backend_ratio_bar(rows, f"SAP fwd B=64: {backend} <= {limit:g}x bare "
                                          "cuBLAS GEMM", sap, "fwd", backend, "gemm", limit,
                                          p))
        out.append(_ratio_bar(rows, "SAP fwd B=64: >= 10x faster than the window loop", sap,
                              "fwd", "loop", "fused", 10.0, "ge", p))
        for B, Lk in ((64, 729), (8, 3645)):
            p = {"B": B, "Lk": Lk, "Lq": 9}
            out.append(_bandwidth_bar(rows, f"attention fwd B={B} Lk={Lk}: moves >= 85% of copy "
                                      "bandwidth", att, p, 0.85))
            for other in ("sdpa", "sdpa-padded", "flex"):
                out.append(_ratio_bar(rows, f"attention fwd B={B} Lk={Lk}: faster than {other}",
                                      att, "fwd", other, "fused", 1.0, "ge", p))
        p1 = {"B": 1, "Lk": 729, "Lq": 9}
        out.append(_time_bar(rows, "attention fwd B=1 Lk=729: <= 10 us per call, launch "
                             "included", att, "fwd", "fused-host", 0.010, p1))
        out.append(_time_bar(rows, "attention fwd B=1 Lk=729: <= 10 us per call in a CUDA graph "
                             "(reported)", att, "fwd", "fused-graph", 0.010, p1))
        if "ops" not in ran:
            out = []
        if "model" in ran:
            out.append(_model_speedup_bar(rows, "flashsloth-3.2b", 2.5))
    return out
