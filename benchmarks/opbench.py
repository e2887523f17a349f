"""Timing one op case across its providers, and turning the timings into result rows.

Used by ops_sap.py and ops_attention.py. Every provider of a case is timed in the same
interleaved rounds (see timing.py); the rows then carry, per provider: the median time and
spread, the useful work of the case (FLOPs counted from the fused op, bytes it must move)
as a rate and as a fraction of the device ceiling measured in this run, the ratio to the
case's floor, how many times slower the provider is than the fused op, and peak memory.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .common import Row, RunConfig, free_memory, timing_fields
from .timing import peak_memory_bytes, time_providers


@dataclass
class Provider:
    name: str
    fn: Callable[[], object]
    note: str = ""
    backend: Optional[str] = None
    # Work of this provider when it is not the op's (the floor GEMM does less than the op)
    flops: Optional[int] = None
    compile_s: Optional[float] = None
    # fn makes this many calls of the op (launch-bound GPU providers: back-to-back calls timed
    # from the host, or a CUDA graph of calls); the row reports the time per call
    calls: int = 1
    # Bytes this provider moves when they are not the op's (the interleaved read reference);
    # its row then reports GB/s of these bytes and no FLOP rate
    nbytes: Optional[int] = None


@dataclass
class OpCase:
    section: str
    case: str
    mode: str                      # "fwd" or "fwd+bwd"
    params: Dict[str, object]
    providers: List[Provider]
    fused: str = "fused"           # the provider the others are compared with
    flops: Optional[int] = None    # useful FLOPs of the op in this mode (from the counter)
    bytes: Optional[int] = None    # bytes the op must move at least in this mode
    floor_ms: Optional[float] = None
    floor_name: Optional[str] = None
    # provider name -> reason it is not run (recorded as a "not available" row)
    unavailable: Dict[str, str] = field(default_factory=dict)
    # more floors of the case (name -> ms), reported next to the main one: every row gets
    # <name>_floor_ms and ratio_to_<name>_floor (e.g. attention's read and compute floors)
    extra_floors: Dict[str, float] = field(default_factory=dict)
    # A provider that reads a buffer far larger than the last-level cache (the read ceiling's
    # reduction), timed in this case's own rounds: every row of the case gets
    # pct_read_interleaved, its GB/s against that provider's. A shared machine's bandwidth
    # can move by half between the run-start ceiling and the case (measured: 32 -> 56 GB/s
    # on the same VM minutes apart), so the bandwidth bars use this one where it ran.
    read_provider: Optional[str] = None


# fused backends timed besides "auto" on each device type
FUSED_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


def fused_providers(call, wrap, auto: str, explain, device_type: str):
    """Providers of a fused op: "fused" (backend auto) and "fused-<b>" for every other backend
    that can run here. ``call(backend)`` runs the op; ``explain`` maps backend -> reasons.
    Returns (providers, unavailable) with unavailable: provider name -> why it cannot run."""
    note = "" if auto != "reference" else (
        "auto fell back to the reference backend: "
        + "; ".join(f"{b}: {', '.join(r)}" for b, r in explain.items() if r))
    providers = [Provider("fused", wrap(lambda: call(None)), backend=auto, note=note)]
    unavailable = {}
    for name in FUSED_BACKENDS.get(device_type, ()):
        if name == auto:
            continue
        why = explain.get(name, [f"backend {name!r} is not registered"])
        if why:
            unavailable[f"fused-{name}"] = "; ".join(why)
            continue
        providers.append(Provider(f"fused-{name}", wrap(lambda name=name: call(name)), backend=name))
    return providers, unavailable


def warm_compiled(provider: Provider) -> Provider:
    """Run a torch.compile provider once so its compile time is recorded, not timed."""
    t0 = time.perf_counter()
    provider.fn()
    provider.compile_s = time.perf_counter() - t0
    return provider


def _provider_bytes(case: OpCase, p: Provider) -> Optional[int]:
    """Bytes ``p`` moves: its own, else the op's (None for a provider with its own FLOPs, the
    floor GEMM, whose bytes are not the op's)."""
    if p.nbytes is not None:
        return p.nbytes
    return case.bytes if p.flops is None else None


def run_case(case: OpCase, cfg: RunConfig, floor_provider: Optional[str] = None) -> List[Row]:
    """Time every provider of ``case`` and return one row per provider.

    ``floor_provider``: name of a provider whose median is the floor of the case (SAP's bare
    GEMM); otherwise ``case.floor_ms`` (the bandwidth floor of a memory-bound op) is used.
    """
    free_memory(cfg.device)
    fns = {p.name: p.fn for p in case.providers}
    timings, errors = time_providers(fns, cfg.device, cfg.budget)
    for p in case.providers:
        if p.calls > 1 and p.name in timings:
            t = timings[p.name]
            timings[p.name] = dataclasses.replace(
                t, median_ms=t.median_ms / p.calls, q25_ms=t.q25_ms / p.calls,
                q75_ms=t.q75_ms / p.calls, min_ms=t.min_ms / p.calls)
    floor_ms = case.floor_ms
    floor_name = case.floor_name
    if floor_provider is not None and floor_provider in timings:
        floor_ms = timings[floor_provider].median_ms
        floor_name = floor_provider
    fused_ms = timings[case.fused].median_ms if case.fused in timings else None
    read_gbps = None
    if case.read_provider is not None and case.read_provider in timings:
        rp = next(p for p in case.providers if p.name == case.read_provider)
        read_gbps = (_provider_bytes(case, rp) or 0) / (timings[rp.name].median_ms * 1e-3) / 1e9
    ceil = cfg.ceilings
    rows: List[Row] = []
    for p in case.providers:
        row: Row = {"section": case.section, "case": case.case, "provider": p.name,
                    "mode": case.mode, "dtype": cfg.dtype_name, **case.params,
                    "backend": p.backend, "note": p.note}
        if p.name in errors:
            row.update(status="error", note=f"{p.note}; {errors[p.name]}".strip("; "))
            rows.append(row)
            continue
        t = timings[p.name]
        row["status"] = "ok"
        row.update(timing_fields(t))
        secs = t.median_ms * 1e-3
        flops = p.flops if p.flops is not None else (case.flops if p.nbytes is None else None)
        if flops:
            row["flops"] = flops
            row["gflops"] = flops / secs / 1e9
            if ceil is not None:
                row["pct_matmul_ceiling"] = 100.0 * row["gflops"] / ceil.matmul_gflops
        nbytes = _provider_bytes(case, p)
        if nbytes:
            row["bytes"] = nbytes
            row["gbps"] = nbytes / secs / 1e9
            if ceil is not None:
                row["pct_copy_ceiling"] = 100.0 * row["gbps"] / ceil.copy_gbps
                if ceil.read_gbps:
                    row["pct_read_ceiling"] = 100.0 * row["gbps"] / ceil.read_gbps
        own_work = p.nbytes is not None  # not the op's work: no floor or speed-up columns
        if floor_ms and not own_work:
            row["floor"] = floor_name
            row["floor_ms"] = floor_ms
            row["ratio_to_floor"] = t.median_ms / floor_ms
        for fname, fms in ({} if own_work else case.extra_floors).items():
            row[f"{fname}_floor_ms"] = fms
            row[f"ratio_to_{fname}_floor"] = t.median_ms / fms if fms > 0 else None
        if read_gbps and row.get("gbps"):
            row["read_interleaved_gbps"] = read_gbps
            row["pct_read_interleaved"] = 100.0 * row["gbps"] / read_gbps
        if fused_ms and not own_work:
            # > 1: the fused op is that many times faster than this provider
            row["fused_speedup"] = t.median_ms / fused_ms
        if p.compile_s is not None:
            row["compile_s"] = p.compile_s
        row["peak_mem_bytes"] = peak_memory_bytes(p.fn, cfg.device)
        rows.append(row)
    for name, why in case.unavailable.items():
        rows.append({"section": case.section, "case": case.case, "provider": name,
                     "mode": case.mode, "dtype": cfg.dtype_name, **case.params,
                     "status": "not available", "note": why})
    return rows
