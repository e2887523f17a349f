"""Query-to-patch attention (EmbQ's image -> query step) against its floor and baselines.

Problem: H = 32 heads, Lq = 9 queries, key head dim Dk = 18, value head dim Dv = 36, over
Lk = 729 patch keys (27 x 27) or 3645 (HD: 5 views), batch B, no mask (EmbQ's i2q softmax
runs over every patch). A few queries against many keys: memory-bound, so the floor is the
bytes the op must move over the copy bandwidth measured in this run.

Providers, timed in the same interleaved rounds:
  fused            query_patch_attention, backend "auto" (the backend it picked is recorded)
  fused-<backend>  every other fused backend that can run here (GPU: triton, cuda)
  eager            matmul, softmax (fp32), matmul
  sdpa             F.scaled_dot_product_attention, PyTorch's choice of backend
  sdpa-padded      SDPA on q/k zero-padded to 24 and v to 40 dims (explicit scale 1/sqrt(18)),
                   so its faster backends can run; padding done once outside the timing
  flex             torch.compile(flex_attention), where it runs (forward only on CPU)
  compile          torch.compile of the reference (compile time reported, not timed)
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


def sweep(cfg: RunConfig, mode: str) -> List[Tuple[int, int]]:
    """(B, Lk) cases: a batch sweep at the base key count and the HD key count."""
    if cfg.on_gpu:
        if cfg.quick:
            return [(64, 729), (8, 3645)]
        return [(1, 729), (8, 729), (64, 729), (1, 3645), (8, 3645), (64, 3645)]
    if cfg.quick:
        return [(1, 729)]
    # the CPU bars: B = 1 and B = 16 at Lk = 729
    return [(1, 729), (4, 729), (16, 729), (1, 3645), (4, 3645)]


def make_inputs(B: int, Lk: int, device, dtype, requires_grad: bool):
    q = torch.randn(B, H, LQ, DK, device=device).to(dtype)
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


def _fwd_bwd(f, inputs, grad_out):
    def run():
        return torch.autograd.grad(f(), inputs, grad_out)
    return run


def _bytes(B: int, Lk: int, itemsize: int, mode: str) -> int:
    q, k, v = B * H * LQ * DK, B * H * Lk * DK, B * H * Lk * DV
    out = B * H * LQ * DV
    fwd = (q + k + v + out) * itemsize
    if mode == "fwd":
        return fwd
    return fwd + (q + k + v + 2 * out + q + k + v) * itemsize


def _op_flops(B: int, Lk: int, dtype, mode: str) -> int:
    from flashsloth_kernels import query_patch_attention

    q, k, v = make_inputs(B, Lk, "meta", dtype, mode != "fwd")
    f = lambda: query_patch_attention(q, k, v)  # noqa: E731
    if mode == "fwd":
        return count_flops(f)
    g = torch.empty(B, H, LQ, DV, device="meta", dtype=dtype)
    return count_flops(_fwd_bwd(f, [q, k, v], g))


def _compile_here(cfg: RunConfig, B: int, Lk: int, mode: str) -> Optional[str]:
    """None when the torch.compile providers run for this case, else why not.

    Every compile (one per shape: flex_attention needs static shapes) costs 10-30 s, so they
    run only for the bar cases: on CPU the forward at B = 1 and 16 (Lk = 729), on GPU forward
    and backward at B = 64 (Lk = 729) and B = 8 (Lk = 3645).
    """
    if cfg.quick:
        return "skipped in --quick (compile time)"
    if cfg.on_gpu:
        if (B, Lk) not in ((64, 729), (8, 3645)):
            return "compiled only for the bar cases (B = 64 at Lk = 729, B = 8 at Lk = 3645)"
        return None
    if not (Lk == 729 and B in (1, 16) and mode == "fwd"):
        return "compiled on CPU only for the forward bar cases (B = 1, 16 at Lk = 729)"
    return None


def _build(cfg: RunConfig, B: int, Lk: int, mode: str) -> OpCase:
    from flashsloth_kernels import query_patch_attention
    from flashsloth_kernels.attention.op import dispatcher

    dev, dt = cfg.device, cfg.dtype
    grad = mode != "fwd"
    q, k, v = inputs = make_inputs(B, Lk, dev, dt, grad)
    scale = DK ** -0.5
    gout = torch.randn(B, H, LQ, DV, device=dev, dtype=dt)
    auto = dispatcher.select(None, dev, dt)
    explain = dispatcher.explain(dev, dt)

    def wrap(f):
        return _fwd_bwd(f, inputs, gout) if grad else f

    providers: List[Provider] = []
    fused, unavailable = fused_providers(
        lambda b: query_patch_attention(q, k, v, scale=scale, backend=b), wrap, auto, explain,
        dev.type)
    providers.extend(fused)
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
    why_not = _compile_here(cfg, B, Lk, mode)
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

    nbytes = _bytes(B, Lk, q.element_size(), mode)
    ceil = cfg.ceilings
    floor_ms = nbytes / (ceil.copy_gbps * 1e9) * 1e3 if ceil is not None else None
    return OpCase(section=SECTION, case=f"B{B}-Lk{Lk}", mode=mode,
                  params={"B": B, "Lk": Lk, "H": H, "Lq": LQ, "Dk": DK, "Dv": DV},
                  providers=providers, flops=_op_flops(B, Lk, dt, mode), bytes=nbytes,
                  floor_ms=floor_ms, floor_name="bytes / copy bandwidth",
                  unavailable=unavailable)


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
        for B, Lk in sweep(cfg, mode):
            out.append(Case(SECTION, f"attention {mode} B={B} Lk={Lk}",
                            lambda B=B, Lk=Lk, mode=mode: _run(cfg, B, Lk, mode)))
    return out


def _run(cfg: RunConfig, B: int, Lk: int, mode: str) -> List[Row]:
    try:
        op_case = _build(cfg, B, Lk, mode)
    except Exception as exc:
        return [error_row(SECTION, f"B{B}-Lk{Lk}", exc, mode=mode)]
    return run_case(op_case, cfg)
