"""The registered ops ``flashsloth::query_patch_attention`` (+ ``_backward``), the public function.

Naming chain: kernels (csrc/attention, fused_triton.py) -> host functions ``attn_fwd`` /
``attn_bwd`` (one pair per backend module; reference.py's are ``attn_reference_fwd`` / ``_bwd``)
-> registered ops ``flashsloth::query_patch_attention`` / ``..._backward`` -> public function
:func:`query_patch_attention` -> module ``EmbeddedQuery``.

The forward op returns (out, lse); lse (B, H, Lq) is what the backward recomputes the
probabilities from, and is not differentiable. The public function returns out only.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _checks
from .._op import FusedOp, compute_dtype
from . import reference

Tensor = torch.Tensor

MAX_HEAD_DIM = 256

fused = FusedOp("query_patch_attention", folder="attention", prefix="attn",
                reference_hosts=(reference.attn_reference_fwd, reference.attn_reference_bwd),
                plain_reference=("flashsloth_kernels.attention.reference."
                                 "query_patch_attention_reference"))
dispatcher = fused.dispatcher

# "auto" on CUDA, from the H200 run of 2026-12-04 (benchmarks/results/nvidia-h200/, bf16,
# H = 32, Lq = 9, Dk/Dv = 18/36; median per call, do_bench):
#   forward  B=1 Lk=729: cuda 0.066 ms, triton 0.278 | B=8 Lk=729: 0.064 vs 0.252
#            B=1 Lk=3645: 0.099 vs 0.331 | B=8 Lk=3645: 0.193 vs 0.144
#            B=64 Lk=729: 0.299 vs 0.257 | B=64 Lk=3645: 1.392 vs 0.351
# Small problems are host-bound (Triton's launch path costs ~0.2 ms more per call than the
# extension's); from ~half a million keys x heads on, Triton's kernel is the faster one.
# EmbQ at inference (B = 1, 729 or 3645 keys) is on the cuda side of the line.
LARGE_KEYS_X_HEADS = 1 << 19


def _cuda_order(facts):
    if facts.get("large"):
        return ("triton", "cuda", "reference")
    return ("cuda", "triton", "reference")


dispatcher.set_order("cuda", _cuda_order)


def _large(q: Tensor, k: Tensor) -> bool:
    """Whether "auto" prefers the large-problem order. Symbolic sizes (export, dynamic
    compile) answer False: the op resolves "auto" again where it runs, with real sizes."""
    n = q.shape[0] * q.shape[1] * k.shape[2]
    return n >= LARGE_KEYS_X_HEADS if isinstance(n, int) else False


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _degenerate(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """No work for a kernel: an empty batch / head / query axis, or no key at all."""
    return q.numel() == 0 or k.shape[2] == 0 or v.shape[3] == 0


def _forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
             backend: str) -> Tuple[Tensor, Tensor]:
    if _degenerate(q, k, v):
        B, H, Lq, _ = q.shape
        out = q.new_zeros(B, H, Lq, v.shape[3])
        lse = q.new_full((B, H, Lq), math.inf, dtype=_lse_dtype(q.dtype))
        return out, lse
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad  # as the public function
    name = fused.resolve(backend, q.device, q.dtype, needs_grad=needs_grad, large=_large(q, k))
    out, lse = fused.host(name)[0](q, k, v, key_padding_mask, scale)
    # the fake kernel promises contiguous outputs (no-ops for the backends' own buffers)
    return out.contiguous(), lse.contiguous()


def _forward_fake(q, k, v, key_padding_mask, scale, backend):
    B, H, Lq, _ = q.shape
    return (q.new_empty(B, H, Lq, v.shape[3]),
            q.new_empty(B, H, Lq, dtype=_lse_dtype(q.dtype)))


def _backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 key_padding_mask: Optional[Tensor], scale: float, out: Tensor, lse: Tensor,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if _degenerate(q, k, v):
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    name = fused.resolve(backend, q.device, q.dtype, needs_grad=True, large=_large(q, k))
    dq, dk, dv = fused.host(name)[1](grad_out, q, k, v, key_padding_mask, scale, out, lse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _backward_fake(grad_out, q, k, v, key_padding_mask, scale, out, lse, backend):
    # contiguous, whatever the inputs' strides: what every backend returns
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None, None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = fused.call_backward(
        (grad_out, q, k, v, key_padding_mask, ctx.scale, out, lse, ctx.backend),
        (grad_out, q, k, v, key_padding_mask), q.device)
    return (dq if ctx.needs_input_grad[0] else None,
            dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None,
            None, None, None)


def attention_flops(B: int, H: int, Lq: int, Lk: int, Dk: int, Dv: int) -> int:
    """Forward FLOPs: q k^T (2 Lq Lk Dk) and p v (2 Lq Lk Dv) per (b, h); softmax not counted."""
    return 2 * B * H * Lq * Lk * (Dk + Dv)


def attention_backward_flops(B: int, H: int, Lq: int, Lk: int, Dk: int, Dv: int) -> int:
    """Backward FLOPs per (b, h): recomputed q k^T (2 Lq Lk Dk), dv = p^T dO (2 Lq Lk Dv),
    dp = dO v^T (2 Lq Lk Dv), dq = ds k and dk = ds^T q (2 Lq Lk Dk each)."""
    return 2 * B * H * Lq * Lk * (3 * Dk + 2 * Dv)


def _attn_flop_formula(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    B, H, Lq, Dk = q_shape
    return attention_flops(B, H, Lq, k_shape[2], Dk, v_shape[3])


def _attn_bwd_flop_formula(grad_out_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    B, H, Lq, Dk = q_shape
    return attention_backward_flops(B, H, Lq, k_shape[2], Dk, v_shape[3])


fused.define(_forward, _forward_fake, _backward_impl, _backward_fake, _setup_context, _backward,
             _attn_flop_formula, _attn_bwd_flop_formula)
_attn_op = fused.op
_attn_bwd_op = fused.backward_op


def _kernel_fwd_fake(q, k, v, key_padding_mask, scale, num_splits=0):
    return _forward_fake(q, k, v, key_padding_mask, scale, "")


def _kernel_bwd_fake(grad_out, q, k, v, key_padding_mask, scale, out, lse):
    return _backward_fake(grad_out, q, k, v, key_padding_mask, scale, out, lse, "")


# The compiled kernels (cpu and cuda backends): one schema, a kernel per dispatch key.
# num_splits: CUDA only (split the keys into this many ranges; 0 chooses).
fused.define_kernels(
    "query_patch_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
    "float scale, int num_splits=0) -> (Tensor, Tensor)",
    "query_patch_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
    "Tensor? key_padding_mask, float scale, Tensor out, Tensor lse) -> (Tensor, Tensor, Tensor)",
    _kernel_fwd_fake, _kernel_bwd_fake)


def _check_scale(scale, Dk: int) -> float:
    return _checks.attention_scale("scale", scale, Dk)


def _check_inputs(q, k, v, key_padding_mask) -> None:
    """Raise TypeError / ValueError naming the argument, the shape got and the one expected.
    The messages are built only on failure: this runs on every call."""
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    B, H, Lq, Dk = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != Dk:
        _checks.shape("k", k, (B, H, None, Dk),
                      f"(B, H, Lk, Dk) with B, H, Dk from q {tuple(q.shape)}")
    Lk, Dv = k.shape[2], v.shape[3]
    if v.shape[0] != B or v.shape[1] != H or v.shape[2] != Lk:
        _checks.shape("v", v, (B, H, Lk, None), f"(B, H, Lk, Dv) with B, H from q "
                      f"{tuple(q.shape)} and Lk from k {tuple(k.shape)}")
    if not 1 <= Dk <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head size Dk in 1..{MAX_HEAD_DIM}, got {Dk} "
                         f"(q of shape {tuple(q.shape)})")
    if not 1 <= Dv <= MAX_HEAD_DIM:
        raise ValueError(f"v: expected a head size Dv in 1..{MAX_HEAD_DIM}, got {Dv} "
                         f"(v of shape {tuple(v.shape)})")
    if key_padding_mask is not None:
        _checks.tensor("key_padding_mask", key_padding_mask, floating=False)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = attend), "
                            f"got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected a tensor on q's device {q.device}, "
                             f"got {key_padding_mask.device}")
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != B \
                or key_padding_mask.shape[1] != Lk:
            _checks.shape("key_padding_mask", key_padding_mask, (B, Lk),
                          f"(B, Lk) with B from q {tuple(q.shape)} and Lk from k {tuple(k.shape)}")


def _fast_call(q, k, v, key_padding_mask, scale, backend) -> Optional[Tensor]:
    """The public function for the usual call, checked without building any message: plain
    tensors of one floating dtype on one device with consistent, non-empty shapes, a bool mask
    of shape (B, Lk) or None, scale None or a float in range, no empty axis, in plain eager
    mode (FusedOp.fast_call). None for anything else, errors included: the full path then
    checks, raises or runs it (test_op_scaffold.py holds the two to the same results)."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    B, H, Lq, Dk = qs
    Lk, Dv = ks[2], vs[3]
    if (ks[0] != B or ks[1] != H or ks[3] != Dk or vs[0] != B or vs[1] != H or vs[2] != Lk
            or not (B and H and Lq and Lk) or not 0 < Dk <= MAX_HEAD_DIM
            or not 0 < Dv <= MAX_HEAD_DIM):
        return None
    dtype, device = q.dtype, q.device
    if (dtype not in _checks.FLOAT_DTYPES or k.dtype != dtype or v.dtype != dtype
            or k.device != device or v.device != device):
        return None
    if scale is None:
        scale = Dk ** -0.5
    elif type(scale) is not float or not 0.0 < scale <= _checks.MAX_SCALE:  # NaN fails too
        return None
    tensors: Tuple[Tensor, ...]
    if key_padding_mask is None:
        tensors = (q, k, v)
    elif (type(key_padding_mask) is Tensor and key_padding_mask.dtype == torch.bool
          and key_padding_mask.shape == (B, Lk) and key_padding_mask.device == device):
        tensors = (q, k, v, key_padding_mask)
    else:
        return None
    out = fused.fast_call((q, k, v, key_padding_mask, scale, backend), tensors, device, dtype,
                          large=_large(q, k))
    return None if out is None else out[0].contiguous()


def query_patch_attention(q: Tensor, k: Tensor, v: Tensor,
                          key_padding_mask: Optional[Tensor] = None,
                          scale: Optional[float] = None, *,
                          backend: Optional[str] = None) -> Tensor:
    """Multi-head attention of a few queries over many keys (FlashSloth's EmbQ steps).

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, j]) v[b, h, j], the softmax
    taken over the keys j with key_padding_mask[b, j] True, in fp32.

    Args:
        q: (B, H, Lq, Dk) queries.
        k: (B, H, Lk, Dk) keys.
        v: (B, H, Lk, Dv) values; Dv may differ from Dk. Head sizes Dk, Dv: 1..256.
        key_padding_mask: (B, Lk) bool, True = attend, or None (every key). A query whose keys
            are all masked gets a zero output (and zero gradients), never NaN.
        scale: logit scale, > 0; default Dk ** -0.5.
        backend: None (FLASHSLOTH_BACKEND, default "auto"), "auto", "reference", "cpu",
            "triton" or "cuda". A backend named explicitly that cannot run raises
            BackendUnavailableError saying why.

    Returns:
        (B, H, Lq, Dv) in q's dtype (inside torch.autocast: the autocast dtype, every input
        cast to it). Differentiable in q, k and v in reverse mode; forward-mode AD and
        torch.func.grad / jacrev raise (see flashsloth_kernels/_op.py).

    Example:
        >>> q = torch.randn(2, 32, 9, 18)
        >>> k, v = torch.randn(2, 32, 729, 18), torch.randn(2, 32, 729, 36)
        >>> query_patch_attention(q, k, v).shape
        torch.Size([2, 32, 9, 36])
    """
    out = _fast_call(q, k, v, key_padding_mask, scale, backend)
    if out is not None:
        return out
    _check_inputs(q, k, v, key_padding_mask)
    dtype = compute_dtype("q", q, k=k, v=v)
    fused.check_transforms(q, k, v)
    scale = _check_scale(scale, q.shape[3])
    requested = fused.requested(backend)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    name = fused.resolve(requested, q.device, dtype, needs_grad, large=_large(q, k))  # raises
    args = (q, k, v, key_padding_mask, scale, requested)
    return fused.call(args, (q, k, v), q.device, name)[0]
