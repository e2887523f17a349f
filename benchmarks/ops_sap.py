"""SAP (spatial attention pooling) against its floor and baselines, forward and forward+backward.

Problem: FlashSloth's size, a 27 x 27 grid of C = 1152 features, scorer hidden width 1152,
3 x 3 windows (81 tokens), batch B. The scorer's first Linear is a (B*729 x 1152) by
(1152 x 1152) GEMM that dominates everything else, so the floor is that GEMM alone.

Providers, all timed in the same interleaved rounds:
  fused            spatial_attention_pool, backend "auto" (the backend it picked is recorded)
  fused-<backend>  every other fused backend that can run here (GPU: triton, cuda)
  gemm             x @ w1.T, the floor (in fwd+bwd cases still the forward GEMM alone:
                   the issue's bar "fwd+bwd <= 4.5x the bare GEMM" is against it)
  gemm-fwd+bwd     x @ w1.T with the gradients of x and w1 (3 GEMMs), for context
  loop             a Python loop over the 81 windows scoring each window, as the original code
  reference        the vectorised reference (flashsloth_kernels.sap.reference.sap_reference)
  compile          torch.compile of the reference (compile time reported, not timed)
fwd+bwd cases take the gradients of x and of all four weights.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import Case, Row, RunConfig, error_row, status_row
from .flops import count_flops
from .opbench import OpCase, Provider, fused_providers, run_case, warm_compiled

SECTION = "ops/sap"
H = W = 27
C = 1152
CH = 1152
K = 3

# Fused backends worth timing explicitly per device type (besides what "auto" picks).


def batch_sizes(cfg: RunConfig, mode: str) -> Tuple[int, ...]:
    if cfg.on_gpu:
        return (1, 16, 64) if cfg.quick else (1, 4, 16, 64)
    if cfg.quick:
        return (1,)
    # the CPU bars: forward at B = 1, 4, 16; forward + backward at B = 4
    return (1, 4, 16) if mode == "fwd" else (1, 4)


def sap_loop(x, w1, b1, w2, b2, k: int, Hg: int, Wg: int):
    """The original code's formulation: the scorer MLP and softmax run window by window."""
    B, _, Cx = x.shape
    grid = x.reshape(B, Hg, Wg, Cx)
    tokens = []
    for i in range(0, Hg, k):
        for j in range(0, Wg, k):
            win = grid[:, i:i + k, j:j + k].reshape(B, -1, Cx)
            s = F.linear(torch.relu(F.linear(win, w1, b1)), w2.reshape(1, -1), b2)
            alpha = torch.softmax(s, dim=1)
            tokens.append((alpha * win).sum(1))
    return torch.stack(tokens, dim=1)


def make_inputs(B: int, device, dtype, requires_grad: bool):
    """Random inputs whose scores spread over a few units (a peaked, non-flat softmax)."""
    x = torch.randn(B, H * W, C, device=device)
    w1 = torch.randn(CH, C, device=device) * C ** -0.5
    b1 = torch.randn(CH, device=device) * 0.1
    w2 = torch.randn(1, CH, device=device) * 3.0 * CH ** -0.5
    b2 = torch.randn(1, device=device)
    return [t.to(dtype).requires_grad_(requires_grad) for t in (x, w1, b1, w2, b2)]


def _fwd_bwd(f, inputs, grad_out):
    def run():
        out = f()
        return torch.autograd.grad(out, inputs, grad_out)
    return run


def _op_flops(B: int, dtype, mode: str) -> int:
    """The fused op's FLOPs in ``mode``, from its registered formulas, counted on meta."""
    from flashsloth_kernels import spatial_attention_pool

    x, w1, b1, w2, b2 = make_inputs(B, "meta", dtype, mode != "fwd")
    if mode == "fwd":
        return count_flops(lambda: spatial_attention_pool(x, w1, b1, w2, b2, K))
    g = torch.empty(B, (H // K) * (W // K), C, device="meta", dtype=dtype)
    return count_flops(
        _fwd_bwd(lambda: spatial_attention_pool(x, w1, b1, w2, b2, K), [x, w1, b1, w2, b2], g))


def _build(cfg: RunConfig, B: int, mode: str) -> OpCase:
    from flashsloth_kernels import spatial_attention_pool
    from flashsloth_kernels.sap.op import dispatcher
    from flashsloth_kernels.sap.reference import sap_reference

    dev, dt = cfg.device, cfg.dtype
    grad = mode != "fwd"
    x, w1, b1, w2, b2 = inputs = make_inputs(B, dev, dt, grad)
    w2v = w2.reshape(-1)
    G = math.ceil(H / K) * math.ceil(W / K)
    gout = torch.randn(B, G, C, device=dev, dtype=dt)
    auto = dispatcher.select(None, dev, dt)
    explain = dispatcher.explain(dev, dt)

    def wrap(f) -> object:
        return _fwd_bwd(f, inputs, gout) if grad else f

    providers: List[Provider] = []
    fused, unavailable = fused_providers(
        lambda b: spatial_attention_pool(x, w1, b1, w2, b2, K, backend=b), wrap, auto, explain,
        dev.type)
    providers.extend(fused)

    xd, w1d = x.detach(), w1.detach()
    gemm_flops = count_flops(lambda: xd.to("meta") @ w1d.to("meta").t())
    providers.append(Provider("gemm", lambda: xd @ w1d.t(), note="floor: the scorer GEMM alone",
                              flops=gemm_flops))
    if grad:
        xg, w1g = xd.clone().requires_grad_(), w1d.clone().requires_grad_()
        gy = torch.randn(B, H * W, CH, device=dev, dtype=dt)

        def gemm_fb():
            return torch.autograd.grad(xg @ w1g.t(), [xg, w1g], gy)

        xm, w1m = (t.detach().to("meta").requires_grad_() for t in (xg, w1g))
        gm = gy.to("meta")
        providers.append(Provider(
            "gemm-fwd+bwd", gemm_fb, note="x @ w1.T with dx and dw1 (3 GEMMs)",
            flops=count_flops(lambda: torch.autograd.grad(xm @ w1m.t(), [xm, w1m], gm))))
    if grad and not cfg.on_gpu and (cfg.quick or B > 1):
        # on a 2-core CPU one call takes 5-25 s (the backward runs per window): measured at
        # B = 1 only, outside --quick; no bar uses it
        unavailable["loop"] = ("skipped on CPU " + ("in --quick" if cfg.quick else "above B = 1")
                               + ": its backward is 30-100x the GEMM")
    else:
        providers.append(Provider("loop", wrap(lambda: sap_loop(x, w1, b1, w2, b2, K, H, W)),
                                  note="Python loop over windows, as the original code"))
    providers.append(Provider("reference",
                              wrap(lambda: sap_reference(x, w1, b1, w2v, b2, K, K, H, W)),
                              note="vectorised eager reference"))
    if cfg.quick:
        unavailable["compile"] = "skipped in --quick (compile time)"
    elif not cfg.on_gpu and B != 4:
        # each batch size compiles anew (10-30 s of a 2-core CPU): B = 4, the size of the
        # forward + backward bar, stands for the sweep
        unavailable["compile"] = "compiled on CPU at B = 4 only (compile time)"
    else:
        compiled = _compiled_reference()
        try:
            providers.append(warm_compiled(Provider(
                "compile", wrap(lambda: compiled(x, w1, b1, w2v, b2)),
                note="torch.compile(reference)")))
        except Exception as exc:
            unavailable["compile"] = f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
    return OpCase(section=SECTION, case=f"B{B}-{H}x{W}-C{C}-k{K}", mode=mode,
                  params={"B": B, "grid": f"{H}x{W}", "C": C, "window": K},
                  providers=providers, flops=_op_flops(B, dt, mode), unavailable=unavailable)


_COMPILED: Optional[object] = None


def _compiled_reference():
    """One torch.compile object shared by every case, so that after the first two batch
    sizes (the first is specialised, the next makes the batch dynamic) the sweep stops
    recompiling."""
    global _COMPILED
    if _COMPILED is None:
        from flashsloth_kernels.sap.reference import sap_reference

        def reference_27x27(x, w1, b1, w2, b2):
            return sap_reference(x, w1, b1, w2, b2, K, K, H, W)

        _COMPILED = torch.compile(reference_27x27)
    return _COMPILED


def cases(cfg: RunConfig) -> List[Case]:
    try:
        import flashsloth_kernels  # noqa: F401
        from flashsloth_kernels.sap.reference import sap_reference  # noqa: F401
    except Exception as exc:
        return [Case(SECTION, "SAP", lambda exc=exc: [status_row(
            SECTION, "SAP", "not available", f"flashsloth_kernels' SAP cannot be imported: "
            f"{type(exc).__name__}: {exc}")])]
    out: List[Case] = []
    for mode in ("fwd", "fwd+bwd"):
        for B in batch_sizes(cfg, mode):
            out.append(Case(SECTION, f"SAP {mode} B={B}",
                            lambda B=B, mode=mode: _run(cfg, B, mode)))
    return out


def _run(cfg: RunConfig, B: int, mode: str) -> List[Row]:
    case = f"B{B}-{H}x{W}-C{C}-k{K}"
    try:
        op_case = _build(cfg, B, mode)
    except Exception as exc:
        return [error_row(SECTION, case, exc, mode=mode)]
    return run_case(op_case, cfg, floor_provider="gemm")
