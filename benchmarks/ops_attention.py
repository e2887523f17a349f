"""Query-to-patch attention (EmbQ's image -> query step) against its floor and baselines.

Problem: H = 32 heads, Lq = 9 queries, key head dim Dk = 18, value head dim Dv = 36, over
Lk = 729 patch keys (27 x 27) or 3645 (HD: 5 views), batch B, no mask (EmbQ's i2q softmax
runs over every patch); on CPU also Lq = 1, 2 and 17 at B = 1 and 16. A few queries against
many keys: memory-bound, so the floor is the bytes the op must move over the bandwidth
measured in this run. Every row carries three floors: bytes / copy bandwidth (``floor_ms``,
as before), bytes / read bandwidth (``read_floor_ms``: the op reads ~99% of its bytes) and
FLOPs / matmul rate (``compute_floor_ms``); ``binds`` names the larger of the last two.

Providers, timed in the same interleaved rounds:
  fused            query_patch_attention, backend "auto" (the backend it picked is recorded)
  fused-bf16       CPU fp32 runs, forward B = 16 Lk = 729: the same op on bf16 copies of the
                   inputs (half the bytes; the issue's bar: faster than the fp32 forward)
  fused-fp16       the same on fp16 copies (the issue: at least as fast as fp32)
  fused-<backend>  every other fused backend that can run here (GPU: triton, cuda)
  fused-host       GPU, B = 1 forward: back-to-back calls timed from the host, launch included
  fused-graph      GPU, B = 1 forward: the same calls replayed from one CUDA graph
  eager            matmul, softmax (fp32), matmul
  sdpa             F.scaled_dot_product_attention, PyTorch's choice of backend
  sdpa-padded      SDPA on q/k zero-padded to 24 and v to 40 dims (explicit scale 1/sqrt(18)),
                   so its faster backends can run; padding done once outside the timing
  flex             torch.compile(flex_attention), where it runs (forward only on CPU)
  compile          torch.compile of the reference (compile time reported, not timed)
  read             CPU forward, the two bandwidth-bar cases: the read ceiling's reduction
                   (sum of a buffer far larger than the cache) in the case's own rounds; every
                   row of the case then carries ``pct_read_interleaved`` (its GB/s against
                   this one's), which the bandwidth bars use: on a shared machine the read
                   rate moved from 32 to 56 GB/s between two runs minutes apart
Bytes: forward q + k + v + out; forward+backward adds q, k, v, out, dout read again and dq,
dk, dv written. FLOPs come from the op's registered formulas through FlopCounterMode.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import Case, Row, RunConfig, error_row, status_row
from .flops import count_flops
from .opbench import OpCase, Provider, fused_providers, run_case, warm_compiled

SECTION = "ops/attention"
H, LQ, DK, DV = 32, 9, 18, 36
DK_PAD, DV_PAD = 24, 40
# (B, Lk, Lq) of the CPU bars "moves >= 60% of read bandwidth" (bars.py)
BANDWIDTH_BAR_CASES = ((16, 729, LQ), (4, 3645, LQ))


def sweep(cfg: RunConfig, mode: str) -> List[Tuple[int, int, int]]:
    """(B, Lk, Lq) cases: a batch sweep at the base key count and the HD key count, and on CPU
    (forward) the query counts of the issue's "never slower than eager" bar."""
    if cfg.on_gpu:
        if cfg.quick:
            return [(64, 729, LQ), (8, 3645, LQ)]
        return [(B, Lk, LQ) for Lk in (729, 3645) for B in (1, 8, 64)]
    if cfg.quick:
        return [(1, 729, LQ)]
    # the CPU bars: B = 1 and B = 16 at Lk = 729, B = 4 at Lk = 3645
    base = [(1, 729, LQ), (4, 729, LQ), (16, 729, LQ), (1, 3645, LQ), (4, 3645, LQ)]
    if mode != "fwd":
        return base
    return base + [(B, 729, lq) for B in (1, 16) for lq in (1, 2, 17)]


def make_inputs(B: int, Lk: int, device, dtype, requires_grad: bool, Lq: int = LQ):
    q = torch.randn(B, H, Lq, DK, device=device).to(dtype)
    k = torch.randn(B, H, Lk, DK, device=device).to(dtype)
    v = torch.randn(B, H, Lk, DV, device=device).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def eager_attention(q, k, v, scale: float):
    """The textbook formulation: logits, softmax in fp32, weighted sum."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(p, v)


def _pad(t, d: int):
    return F.pad(t, (0, d - t.shape[-1]))


_COMPILED: Dict[str, object] = {}


def _compiled(name: str):
    """One compiled callable per kind, shared by every case (recompiles only on new shapes)."""
    if name not in _COMPILED:
        if name == "reference":
            from flashsloth_kernels.attention.reference import query_patch_attention_reference

            def reference_out(q, k, v, scale):
                return query_patch_attention_reference(q, k, v, None, scale)[0]

            _COMPILED[name] = torch.compile(reference_out, dynamic=False)
        else:
            from torch.nn.attention.flex_attention import flex_attention

            _COMPILED[name] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED[name]


LAUNCH_CALLS = 100


def launch_bound_providers(call, backend: str) -> List[Provider]:
    """B = 1 on a GPU is launch-bound: the event-timed "fused" row is the kernel alone. Two
    more rows, both per call: "fused-host", LAUNCH_CALLS back-to-back calls through the public
    op (Python, dispatch and launch included, the GPU waiting on the host), and
    "fused-graph", the same calls captured once in a CUDA graph and replayed."""
    def host():
        for _ in range(LAUNCH_CALLS):
            call()
        torch.cuda.synchronize()

    out = [Provider("fused-host", host, backend=backend, calls=LAUNCH_CALLS,
                    note=f"{LAUNCH_CALLS} back-to-back calls, launch included, per call")]
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                call()  # warm-up off the capture (lazy init, autotuning, allocator)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(LAUNCH_CALLS):
                call()
        out.append(Provider("fused-graph", graph.replay, backend=backend, calls=LAUNCH_CALLS,
                            note=f"a CUDA graph of {LAUNCH_CALLS} calls, per call"))
    except Exception as exc:  # reported as an error row by the timing, not fatal
        def failed(exc=exc):
            raise RuntimeError(f"CUDA graph capture failed: {type(exc).__name__}: {exc}")
        out.append(Provider("fused-graph", failed, backend=backend))
    return out


def _fwd_bwd(f, inputs, grad_out):
    def run():
        return torch.autograd.grad(f(), inputs, grad_out)
    return run


def _bytes(B: int, Lk: int, itemsize: int, mode: str, Lq: int = LQ) -> int:
    q, k, v = B * H * Lq * DK, B * H * Lk * DK, B * H * Lk * DV
    out = B * H * Lq * DV
    fwd = (q + k + v + out) * itemsize
    if mode == "fwd":
        return fwd
    return fwd + (q + k + v + 2 * out + q + k + v) * itemsize


def _op_flops(B: int, Lk: int, dtype, mode: str, Lq: int = LQ) -> int:
    from flashsloth_kernels import query_patch_attention

    q, k, v = make_inputs(B, Lk, "meta", dtype, mode != "fwd", Lq)
    f = lambda: query_patch_attention(q, k, v)  # noqa: E731
    if mode == "fwd":
        return count_flops(f)
    g = torch.empty(B, H, Lq, DV, device="meta", dtype=dtype)
    return count_flops(_fwd_bwd(f, [q, k, v], g))


def _compile_here(cfg: RunConfig, B: int, Lk: int, mode: str, Lq: int = LQ) -> Optional[str]:
    """None when the torch.compile providers run for this case, else why not.

    Every compile (one per shape: flex_attention needs static shapes) costs 10-30 s, so they
    run only for the bar cases: on CPU the forward at B = 1 and 16 (Lk = 729), on GPU the
    forward at B = 64 (Lk = 729) and B = 8 (Lk = 3645).
    """
    if cfg.quick:
        return "skipped in --quick (compile time)"
    if cfg.on_gpu:
        if (B, Lk) not in ((64, 729), (8, 3645)) or mode != "fwd":
            return ("compiled only for the forward bar cases (B = 64 at Lk = 729, B = 8 at "
                    "Lk = 3645): compile time")
        return None
    if not (Lk == 729 and B in (1, 16) and mode == "fwd" and Lq == LQ):
        return "compiled on CPU only for the forward bar cases (B = 1, 16 at Lk = 729, Lq = 9)"
    return None


def _build(cfg: RunConfig, B: int, Lk: int, mode: str, Lq: int = LQ) -> OpCase:
    from flashsloth_kernels import query_patch_attention
    from flashsloth_kernels.attention.op import dispatcher

    dev, dt = cfg.device, cfg.dtype
    grad = mode != "fwd"
    q, k, v = inputs = make_inputs(B, Lk, dev, dt, grad, Lq)
    scale = DK ** -0.5
    gout = torch.randn(B, H, Lq, DV, device=dev, dtype=dt)
    auto = dispatcher.select(None, dev, dt)
    explain = dispatcher.explain(dev, dt)

    def wrap(f):
        return _fwd_bwd(f, inputs, gout) if grad else f

    providers: List[Provider] = []
    fused, unavailable = fused_providers(
        lambda b: query_patch_attention(q, k, v, scale=scale, backend=b), wrap, auto, explain,
        dev.type)
    providers.extend(fused)
    if dev.type == "cpu" and dt == torch.float32 and mode == "fwd" and (B, Lk, Lq) == (16, 729, LQ):
        for short, half in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            qh, kh, vh = (t.detach().to(half) for t in (q, k, v))
            providers.append(Provider(
                f"fused-{short}",
                lambda qh=qh, kh=kh, vh=vh: query_patch_attention(qh, kh, vh, scale=scale),
                backend=dispatcher.select(None, dev, half),
                note=f"the fused op on {short} copies of the inputs (half the bytes)"))
    if cfg.on_gpu and not grad and B == 1:
        providers.extend(launch_bound_providers(
            lambda: query_patch_attention(q, k, v, scale=scale), auto))
    providers.append(Provider("eager", wrap(lambda: eager_attention(q, k, v, scale)),
                              note="matmul, softmax (fp32), matmul"))
    providers.append(Provider("sdpa", wrap(lambda: F.scaled_dot_product_attention(
        q, k, v, scale=scale)), note="PyTorch's backend choice"))
    # padded copies are leaves of their own so the backward reaches them; the padding itself
    # is not timed (a favour to this baseline)
    qp, kp, vp = (_pad(t.detach(), d).requires_grad_(grad) for t, d in
                  ((q, DK_PAD), (k, DK_PAD), (v, DV_PAD)))
    goutp = _pad(gout, DV_PAD)

    def sdpa_padded():
        return F.scaled_dot_product_attention(qp, kp, vp, scale=scale)[..., :DV]

    providers.append(Provider(
        "sdpa-padded",
        _fwd_bwd(lambda: F.scaled_dot_product_attention(qp, kp, vp, scale=scale), [qp, kp, vp],
                 goutp) if grad else sdpa_padded,
        note=f"q/k padded to {DK_PAD}, v to {DV_PAD} (padding not timed)"))
    read_provider = None
    if (dev.type == "cpu" and mode == "fwd" and (B, Lk, Lq) in BANDWIDTH_BAR_CASES
            and cfg.ceilings is not None):
        # the read ceiling's reduction, in this case's rounds (OpCase.read_provider)
        buf = torch.empty(cfg.ceilings.copy_bytes // 4, dtype=torch.float32,
                          device=dev).uniform_()
        read_provider = "read"
        providers.append(Provider(
            read_provider, lambda: buf.sum(), nbytes=buf.numel() * buf.element_size(),
            note=f"the read ceiling's src.sum() over {buf.numel() * 4 >> 20} MB, timed in this "
                 "case's rounds (its GB/s: that buffer's)"))
    why_not = _compile_here(cfg, B, Lk, mode, Lq)
    if why_not is not None:
        unavailable["flex"] = why_not
        unavailable["compile"] = why_not
    else:
        if grad and not cfg.on_gpu:
            unavailable["flex"] = "FlexAttention has no backward on CPU"
        elif not cfg.on_gpu and B != 16:
            unavailable["flex"] = "compiled on CPU at B = 16 only (compile time)"
        else:
            flex = _compiled("flex")
            try:
                providers.append(warm_compiled(Provider(
                    "flex", wrap(lambda: flex(q, k, v, scale=scale)),
                    note="torch.compile(flex_attention)")))
            except Exception as exc:
                unavailable["flex"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        ref = _compiled("reference")
        try:
            providers.append(warm_compiled(Provider(
                "compile", wrap(lambda: ref(q, k, v, scale)), note="torch.compile(reference)")))
        except Exception as exc:
            unavailable["compile"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]

    nbytes = _bytes(B, Lk, q.element_size(), mode, Lq)
    flops = _op_flops(B, Lk, dt, mode, Lq)
    ceil = cfg.ceilings
    floor_ms = nbytes / (ceil.copy_gbps * 1e9) * 1e3 if ceil is not None else None
    params = {"B": B, "Lk": Lk, "H": H, "Lq": Lq, "Dk": DK, "Dv": DV}
    extra = {}
    if ceil is not None:
        # the roofline: which of the two floors binds this case
        read_ms = nbytes / (ceil.read_gbps * 1e9) * 1e3 if ceil.read_gbps else None
        compute_ms = flops / (ceil.matmul_gflops * 1e9) * 1e3 if flops else None
        if read_ms:
            extra["read"] = read_ms
        if compute_ms:
            extra["compute"] = compute_ms
        if read_ms and compute_ms:
            params["binds"] = "memory (read)" if read_ms >= compute_ms else "compute"
    return OpCase(section=SECTION, case=f"B{B}-Lk{Lk}" + ("" if Lq == LQ else f"-Lq{Lq}"),
                  mode=mode, params=params, providers=providers, flops=flops, bytes=nbytes,
                  floor_ms=floor_ms, floor_name="bytes / copy bandwidth",
                  unavailable=unavailable, extra_floors=extra, read_provider=read_provider)


def cases(cfg: RunConfig) -> List[Case]:
    try:
        from flashsloth_kernels import query_patch_attention  # noqa: F401
        from flashsloth_kernels.attention.op import dispatcher  # noqa: F401
    except Exception as exc:
        return [Case(SECTION, "attention", lambda exc=exc: [status_row(
            SECTION, "attention", "not available", "flashsloth_kernels.query_patch_attention "
            f"cannot be imported: {type(exc).__name__}: {exc}")])]
    out: List[Case] = []
    for mode in ("fwd", "fwd+bwd"):
        for B, Lk, Lq in sweep(cfg, mode):
            name = f"attention {mode} B={B} Lk={Lk}" + ("" if Lq == LQ else f" Lq={Lq}")
            out.append(Case(SECTION, name,
                            lambda B=B, Lk=Lk, Lq=Lq, mode=mode: _run(cfg, B, Lk, mode, Lq)))
    return out


def _run(cfg: RunConfig, B: int, Lk: int, mode: str, Lq: int = LQ) -> List[Row]:
    try:
        op_case = _build(cfg, B, Lk, mode, Lq)
    except Exception as exc:
        return [error_row(SECTION, f"B{B}-Lk{Lk}", exc, mode=mode)]
    return run_case(op_case, cfg)
