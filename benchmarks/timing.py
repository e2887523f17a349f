"""Timers and peak-memory probes shared by every section.

CPU: after warm-up, providers are timed in interleaved rounds (one sample of each provider
per round, the order rotated every round) so the noise of a shared machine hits all of
them alike; each sample averages ``inner`` back-to-back calls so sub-millisecond ops are
not dominated by the timer. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed
between calls) after its warm-up, or CUDA events around each call when Triton is missing.
Both report the median and the inter-quartile range of the samples.

Peak memory is the high-water mark of memory allocated *during* one call, above what was
allocated before it: the CUDA caching allocator's counters on GPU, the profiler's record
of every CPU allocator event on CPU (it sees the temporaries inside C++ kernels too).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass
class Timing:
    """Summary of the samples of one provider, in milliseconds per call."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    samples: int
    inner: int

    @property
    def spread_pct(self) -> float:
        """Inter-quartile range as a percentage of the median."""
        return 100.0 * (self.q75_ms - self.q25_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d["spread_pct"] = self.spread_pct
        return d


def _quartiles(values: List[float]) -> Tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _summary(samples_s: List[float], inner: int) -> Timing:
    ms = [s * 1e3 for s in samples_s]
    q25, med, q75 = _quartiles(ms)
    return Timing(median_ms=med, q25_ms=q25, q75_ms=q75, min_ms=min(ms), samples=len(ms),
                  inner=inner)


@dataclass
class Budget:
    """How long to sample one case: at least ``min_rounds`` rounds, then stop when
    ``max_rounds`` rounds are done or ``seconds`` have passed."""

    min_rounds: int = 5
    max_rounds: int = 25
    seconds: float = 4.0
    min_sample_s: float = 2e-3  # a CPU sample averages enough calls to last at least this
    warmup: int = 1
    slow_samples: int = 2  # samples of a provider whose single call exceeds its time share


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_providers(fns: Dict[str, Callable[[], object]], device: torch.device,
                   budget: Budget) -> Tuple[Dict[str, Timing], Dict[str, str]]:
    """Time every provider of one case; returns (timings, errors by provider).

    A provider whose first call raises is dropped from the rounds and its error recorded,
    so one broken baseline never stops the others.
    """
    errors: Dict[str, str] = {}
    live: Dict[str, Callable[[], object]] = {}
    first_s: Dict[str, float] = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(1, budget.warmup)):
                synchronize(device)
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                first_s[name] = time.perf_counter() - t0
        except Exception as exc:  # a provider that cannot run this case is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {_short(str(exc))}"
            continue
        live[name] = fn
    if device.type == "cuda":
        return _time_cuda(live, budget), errors
    return _time_cpu(live, first_s, budget), errors


def _warm_call_s(fn: Callable[[], object], budget: Budget) -> float:
    """Seconds of one warm call, to size a sample's back-to-back calls.

    The warm-up call carries one-off costs (first-touch page faults of fresh buffers, lazy
    initialisation, cold caches) that can make it several times a warm call: sized from it, a
    0.2 ms op was sampled one call at a time, each call right after another provider's, so
    its median measured the switch more than the op. So the provider is called again, up to
    3 times or ~one sample's length, and the fastest of these calls counts.
    """
    times: List[float] = []
    while not times or (len(times) < 3 and sum(times) < budget.min_sample_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _time_cpu(fns: Dict[str, Callable[[], object]], first_s: Dict[str, float],
              budget: Budget) -> Dict[str, Timing]:
    if not fns:
        return {}
    names = list(fns)
    # A provider whose one call outlasts its share of the case's time (the original code's
    # window loop is 10-100x slower than the rest) is sampled only ``slow_samples`` times,
    # so it cannot eat the run's budget; the others keep their rounds.
    # Its warm-up call counts as its first sample: one-off start-up costs are noise next to
    # a call that long.
    share = budget.seconds / len(names)
    slow = {n for n in names if share > 0 and first_s[n] > share}
    per_call = {n: first_s[n] if n in slow or budget.min_sample_s <= 0
                else _warm_call_s(fns[n], budget) for n in names}
    inner = {n: max(1, math.ceil(budget.min_sample_s / max(per_call[n], 1e-7))) for n in names}
    cap = {n: budget.slow_samples if n in slow else budget.max_rounds for n in names}
    samples: Dict[str, List[float]] = {n: [first_s[n]] if n in slow else [] for n in names}
    start = time.perf_counter()
    rounds = 0
    while True:
        active = [n for n in names if len(samples[n]) < cap[n]]
        if not active:
            break
        # rotate the order so no provider always runs right after the same neighbour
        order = active[rounds % len(active):] + active[:rounds % len(active)]
        for n in order:
            fn, k = fns[n], inner[n]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[n].append((time.perf_counter() - t0) / k)
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds >= budget.max_rounds:
            break
        if rounds >= budget.min_rounds and elapsed >= budget.seconds:
            break
    return {n: _summary(samples[n], inner[n]) for n in names}


def _time_cuda(fns: Dict[str, Callable[[], object]], budget: Budget) -> Dict[str, Timing]:
    out: Dict[str, Timing] = {}
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    for name, fn in fns.items():
        if do_bench is not None:
            q25, med, q75 = do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
            out[name] = Timing(median_ms=med, q25_ms=q25, q75_ms=q75, min_ms=q25, samples=0,
                               inner=1)
        else:
            out[name] = _time_cuda_events(fn, budget)
    return out


def _time_cuda_events(fn: Callable[[], object], budget: Budget) -> Timing:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < 20 or (time.perf_counter() - start < 0.2 and len(times) < 1000):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return _summary(times, 1)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes allocated at the high-water mark of one call of ``fn``, above the level before it
    (the result of ``fn`` is released before returning). None when it cannot be measured."""
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
            del out
            return int(peak)
        if device.type == "cpu":
            return _cpu_peak(fn)
    except Exception:
        return None
    return None


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side logs every start and stop there."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak(fn: Callable[[], object]) -> Optional[int]:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            events.append((e.start_ns(), int(e.nbytes())))
    if not events:
        return None
    events.sort()
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _short(msg: str, limit: int = 300) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
