"""Triton backend of spatial attention pooling: forward and backward kernels and host functions.

Shapes (as the registered op passes them): x (B, N = H * W, C), any strides; w1 (Ch, C);
b1 (Ch,) or None; w2 (Ch,); b2 (1,) or None; dropout_mask (B, N, Ch) bool or None.
M = B * N is the number of patch rows of the flattened batch.

Cost model (the design follows from it). At FlashSloth's size (B = 64, 27 x 27, C = Ch = 1152)
the scorer GEMM x @ w1.T is 124 GFLOP; everything else is a few passes over x (107 MB in
bf16). So the forward is

  1. ``_sap_fwd_kernel``: the scorer GEMM over the flattened rows, tiled (BLOCK_M x BLOCK_N)
     like any GEMM, with an epilogue that applies b1, relu, dropout and the w2 dot and reduces
     the tile to one partial score per row. The (M, Ch) hidden tensor never reaches memory:
     each program writes BLOCK_M floats.
  2. ``_sap_fwd_pool_kernel``: one program per (batch, window) sums the partial scores of the
     window's patches, takes the window softmax (max subtracted) and writes the weighted sum
     of the patches' features: one pass over x.

Partial scores are kept per SLOT-column slice of Ch (``s_part``: (cdiv(Ch, SLOT), M) fp32)
rather than summed with atomics, so results are deterministic run to run; SLOT is the
smallest BLOCK_N of any autotuning config, which makes the number of slots known before the
autotuner has picked BLOCK_N (a program whose tile spans several slots writes its sum into
the first and zeros into the others, so every slot is written exactly once).

The backward (see reference.sap_reference_bwd for the math) makes four passes:

  1. ``_sap_fwd_kernel`` again with STORE_ACT: recompute the scores and, in the same epilogue,
     write a = relu(z) * mask * scale in x's dtype into a scratch (M, Ch) buffer. The buffer
     lives only inside the backward; nothing of size (N, Ch) is kept from the forward.
  2. ``_sap_bwd_pool_kernel``: per (batch, window), the softmax again, dalpha_i = g . x_i,
     ds_i = alpha_i (dalpha_i - sum_j alpha_j dalpha_j), and the direct term dx_i = alpha_i g.
  3. ``_sap_bwd_dz_kernel``: dz = ds * w2 * scale * [a != 0], written over a in place, while
     the same pass reduces db1 = sum dz, dw2 = sum ds * a and db2 = sum ds (deterministic
     per-split partials, summed on the host). [a != 0] is exactly [z > 0] * mask for any
     nonzero scale, so the dropout mask is not read a second time.
  4. cuBLAS: dW1 = dz^T x and dx += dz W1 (GEMMs at the library's own speed).

The backward stores a rather than recomputing the GEMM a second time for dz: at B = 64 in
bf16, writing and re-reading (M, Ch) values moves 215 MB (~65 us at ~3.3 TB/s), while the
GEMM is 124 GFLOP (~160 us at ~790 TFLOP/s) (derived, not measured).

Precision (docs/contract.md): tl.dot accumulates in fp32; fp32 inputs use
input_precision="ieee" (tf32 would cost ~3e-4 relative error). The stored activation and dz
are fp32 and all softmax and reduction math is fp32; for 16-bit x, dz is rounded to x's dtype
only as the operand of the two gradient GEMMs. b2 shifts every score of a window equally, so
it cancels in the softmax, but it is added (to slot 0 of the partial scores) so that a NaN or
inf b2 poisons the output as the formula says; its gradient (sum of ds) is zero up to rounding.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors with one small config (the
interpreter accepts no multi-config autotuning without a GPU driver).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple, overload

import torch
import triton
import triton.language as tl

from .. import _env, _triton_utils
from .._triton_utils import device_guard as _on_device
from .._triton_utils import dot_precision as _dot_precision
from .._triton_utils import sm_count

Tensor = torch.Tensor

_INTERPRET = _env.triton_interpret()


_triton_utils.fix_interpreter_scalar_index()

# Scorer GEMM configs. H100/H200 bf16 GEMMs of this shape (M = 46656, N = K = 1152) run best
# with 128-row tiles, 128-256 columns and BLOCK_K = 64 (one 128-byte swizzled shared-memory
# row per operand row), 3-4 pipeline stages. The list stays short because every new
# (C, Ch, row-count bucket) key benchmarks all of it once. Configs whose pipeline buffers
# exceed the device's shared memory (fp32 inputs double the bytes) are pruned before
# benchmarking.
# Under the interpreter: one config whose every tl.dot dimension is 16, the GPU minimum for
# 16-bit operands, so the interpreted program shapes are ones a GPU would also accept.
if _INTERPRET:
    _SCORE_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4,
                                    num_stages=1)]
else:
    _SCORE_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        # fp32 (ieee) fallbacks: half the K depth keeps 3 stages inside shared memory
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]

# Width of one partial-score slot: the smallest BLOCK_N of any config (see the module docstring).
_SLOT = min(c.kwargs["BLOCK_N"] for c in _SCORE_CONFIGS)


@functools.lru_cache(maxsize=None)
def _shared_memory_bytes(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    # the opt-in per-block limit (227 KB on H100); older torch builds only expose the default
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def _prune_score_configs(configs, named_args, **kwargs):
    """Drop configs whose pipelined operand tiles do not fit the device's shared memory."""
    x = named_args["x_ptr"]
    if x.device.type != "cuda":
        return configs
    budget = _shared_memory_bytes(x.device.index if x.device.index is not None else 0)
    elem = x.element_size()
    fits = [c for c in configs
            if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
            * elem <= budget]
    return fits or configs[-1:]


@triton.autotune(
    configs=_SCORE_CONFIGS,
    # M_BUCKET (the row count rounded up to a power of two) lets B = 1 and B = 64 tune apart
    # without re-tuning for every batch size; the flags change the epilogue's cost.
    key=["C", "Ch", "M_BUCKET", "HAS_MASK", "STORE_ACT"],
    prune_configs_by={"early_config_prune": _prune_score_configs},
)
@triton.heuristics({"EVEN_K": lambda args: args["C"] % args["BLOCK_K"] == 0})
@triton.jit
def _sap_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, mask_ptr, s_part_ptr, act_ptr,
    M, N, C, Ch, M_BUCKET, NUM_SLOTS,
    stride_xb, stride_xn, stride_xc, stride_wh, stride_wc,
    dropout_scale,
    HAS_B1: tl.constexpr, HAS_MASK: tl.constexpr, STORE_ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Scorer GEMM tile + epilogue: s_part[slot, m] = sum over the tile's columns h of
    relu(x_m . w1_h + b1_h) * mask[m, h] * scale * w2_h; with STORE_ACT also act[m, h] = that
    activation (before the w2 product), in act's dtype.

    Grid: cdiv(M, BLOCK_M) * cdiv(Ch, BLOCK_N) programs. The column tile index varies fastest,
    so the few programs sharing a row block run together and re-read its x rows from L2
    (w1, 2.6 MB at Ch = C = 1152 in bf16, stays in L2 throughout).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(Ch, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < Ch
    ks = tl.arange(0, BLOCK_K)

    # Rows past M and columns past Ch are wrapped onto valid ones, so the K loop's loads need
    # no row / column predicates (the tile edges cost nothing in the hot loop); the epilogue
    # masks what they produce.
    rows_in = rows % M
    cols_in = cols % Ch
    # Row m of the flattened batch is patch n of image b; going through (b, n) strides takes
    # any x layout without a copy. int64: B * N * C can exceed 2**31 elements.
    b_idx = rows_in // N
    n_idx = rows_in - b_idx * N
    x_rows = x_ptr + b_idx.to(tl.int64) * stride_xb + n_idx.to(tl.int64) * stride_xn
    x_ptrs = x_rows[:, None] + ks[None, :] * stride_xc
    # w1 tile loaded as (BLOCK_K, BLOCK_N) = w1^T, so the dot needs no transpose in registers
    w_ptrs = w1_ptr + cols_in[None, :].to(tl.int64) * stride_wh + ks[:, None] * stride_wc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_ok = (k0 + ks) < C
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        x_ptrs += BLOCK_K * stride_xc
        w_ptrs += BLOCK_K * stride_wc

    if HAS_B1:
        acc += tl.load(b1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # relu as torch.relu: NaN stays NaN (tl.maximum may drop it; numeric contract)
    act = tl.where(acc < 0.0, 0.0, acc)
    if HAS_MASK:
        m_ptrs = mask_ptr + rows[:, None].to(tl.int64) * Ch + cols[None, :]
        keep = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
        # a multiply, as the formula says (a select would turn a NaN activation into 0)
        act = act * (keep != 0).to(tl.float32) * dropout_scale
    if STORE_ACT:
        a_ptrs = act_ptr + rows[:, None].to(tl.int64) * Ch + cols[None, :]
        tl.store(a_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    # columns past Ch are duplicates of wrapped ones: dropped by a select, not by w2 = 0 (an
    # inf activation times 0 would be NaN)
    w2 = tl.load(w2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    score = tl.sum(tl.where(col_ok[None, :], act * w2[None, :], 0.0), axis=1)

    slot0 = pid_n * (BLOCK_N // SLOT)
    tl.store(s_part_ptr + slot0.to(tl.int64) * M + rows, score, mask=row_ok)
    for j in tl.static_range(1, BLOCK_N // SLOT):
        tl.store(s_part_ptr + (slot0 + j).to(tl.int64) * M + rows, tl.zeros_like(score),
                 mask=row_ok & (slot0 + j < NUM_SLOTS))


@triton.jit
def _window_softmax(s_part_ptr, b, g, M, N, H, W, Gw, NUM_SLOTS,
                    KH: tl.constexpr, KW: tl.constexpr, WIN_P: tl.constexpr):
    """Patch indices n (WIN_P,), validity, and softmax weights alpha of window g of image b.

    Window (gi, gj) covers rows [gi*KH, gi*KH + KH) and columns [gj*KW, gj*KW + KW) of the
    grid, clipped at the edges; lanes past the window's patches are invalid with alpha = 0.
    """
    gi = g // Gw
    gj = g - gi * Gw
    p = tl.arange(0, WIN_P)
    r = gi * KH + p // KW
    c = gj * KW + p % KW
    valid = (p < KH * KW) & (r < H) & (c < W)
    n = r * W + c
    m = (b * N + n).to(tl.int64)

    s = tl.zeros((WIN_P,), dtype=tl.float32)
    s_ptrs = s_part_ptr + m
    for _ in range(0, NUM_SLOTS):
        s += tl.load(s_ptrs, mask=valid, other=0.0)
        s_ptrs += M
    s = tl.where(valid, s, float("-inf"))
    # every window holds at least one patch, so the max is finite and exp never sees inf - inf
    e = tl.exp(s - tl.max(s, axis=0))
    e = tl.where(valid, e, 0.0)
    alpha = e / tl.sum(e, axis=0)
    return n, m, valid, alpha


@triton.jit
def _sap_fwd_pool_kernel(
    x_ptr, s_part_ptr, out_ptr,
    M, N, C, H, W, Gw, G, NUM_SLOTS,
    stride_xb, stride_xn, stride_xc,
    KH: tl.constexpr, KW: tl.constexpr, WIN_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, g, :] = sum_i alpha_i x[b, n_i, :] over window g's patches. Grid: B * G."""
    pid = tl.program_id(0)
    b = pid // G
    g = pid - b * G
    n, m, valid, alpha = _window_softmax(s_part_ptr, b, g, M, N, H, W, Gw, NUM_SLOTS, KH, KW, WIN_P)

    x_rows = x_ptr + b.to(tl.int64) * stride_xb + n.to(tl.int64) * stride_xn
    out_row = out_ptr + pid.to(tl.int64) * C
    cs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c_ok = (c0 + cs) < C
        xt = tl.load(x_rows[:, None] + (c0 + cs)[None, :] * stride_xc,
                     mask=valid[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        o = tl.sum(alpha[:, None] * xt, axis=0)
        tl.store(out_row + c0 + cs, o.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _sap_bwd_pool_kernel(
    x_ptr, s_part_ptr, g_ptr, ds_ptr, dx_ptr,
    M, N, C, H, W, Gw, G, NUM_SLOTS,
    stride_xb, stride_xn, stride_xc,
    NEED_X: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, WIN_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Window softmax backward. Per window g of image b (grid: B * G):
    dalpha_i = grad[b, g] . x_i, ds_i = alpha_i (dalpha_i - sum_j alpha_j dalpha_j) -> ds (M,)
    fp32; with NEED_X also the direct term dx_i = alpha_i grad[b, g] (dx contiguous (B, N, C),
    every row belongs to exactly one window so every element is written).
    """
    pid = tl.program_id(0)
    b = pid // G
    g = pid - b * G
    n, m, valid, alpha = _window_softmax(s_part_ptr, b, g, M, N, H, W, Gw, NUM_SLOTS, KH, KW, WIN_P)

    x_rows = x_ptr + b.to(tl.int64) * stride_xb + n.to(tl.int64) * stride_xn
    g_row = g_ptr + pid.to(tl.int64) * C
    dx_rows = dx_ptr + m * C
    cs = tl.arange(0, BLOCK_C)
    # 2-D accumulator, reduced once after the loop: one cross-lane reduction per program
    dalpha_acc = tl.zeros((WIN_P, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_ok = (c0 + cs) < C
        tile_ok = valid[:, None] & c_ok[None, :]
        xt = tl.load(x_rows[:, None] + (c0 + cs)[None, :] * stride_xc, mask=tile_ok,
                     other=0.0).to(tl.float32)
        gt = tl.load(g_row + c0 + cs, mask=c_ok, other=0.0).to(tl.float32)
        dalpha_acc += xt * gt[None, :]
        if NEED_X:
            tl.store(dx_rows[:, None] + (c0 + cs)[None, :],
                     (alpha[:, None] * gt[None, :]).to(dx_ptr.dtype.element_ty), mask=tile_ok)
    dalpha = tl.sum(dalpha_acc, axis=1)
    ds = alpha * (dalpha - tl.sum(alpha * dalpha, axis=0))
    tl.store(ds_ptr + m, ds, mask=valid)


@triton.jit
def _sap_bwd_dz_kernel(
    act_ptr, ds_ptr, w2_ptr, part_ptr,
    M, Ch, ROWS_PER_SPLIT, scale,
    NEED_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dz[m, h] = ds[m] * w2[h] * scale * [act[m, h] != 0], written over act in place; with
    NEED_W the split's partial sums db1 = sum_m dz, dw2 = sum_m ds * act (part[split, 0:Ch],
    part[split, Ch:2Ch]) and, from the first column block, db2 = sum_m ds (part[split, 2Ch]).

    Grid: (cdiv(Ch, BLOCK_N), row splits); each program walks ROWS_PER_SPLIT rows so the
    column partials stay in registers and reach memory once per split, not once per row tile.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Ch
    w2s = tl.load(w2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) * scale

    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    db1_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dw2_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db2_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        tile_ok = row_ok[:, None] & col_ok[None, :]
        ptrs = act_ptr + rows[:, None].to(tl.int64) * Ch + cols[None, :]
        a = tl.load(ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        ds = tl.load(ds_ptr + rows, mask=row_ok, other=0.0)
        dz = tl.where(a != 0.0, ds[:, None] * w2s[None, :], 0.0)
        tl.store(ptrs, dz.to(act_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_W:
            db1_acc += dz
            dw2_acc += ds[:, None] * a
            db2_acc += ds
    if NEED_W:
        row = part_ptr + pid_s.to(tl.int64) * (2 * Ch + 1)
        tl.store(row + cols, tl.sum(db1_acc, axis=0), mask=col_ok)
        tl.store(row + Ch + cols, tl.sum(dw2_acc, axis=0), mask=col_ok)
        tl.store(row + 2 * Ch, tl.sum(db2_acc, axis=0), mask=pid_n == 0)


# Elementwise / pooling kernels are bandwidth-bound: ~4096 fp32 values per program tile
# (32 per thread at 4 warps) keeps enough loads in flight without spilling.
_POOL_TILE = 16 if _INTERPRET else 4096
_DZ_BLOCK_M, _DZ_BLOCK_N = (16, 16) if _INTERPRET else (32, 128)


def _target_programs(device: torch.device) -> int:
    """Programs that fill the device a few times over. Under the interpreter a small number,
    so that even tiny test shapes take the multi-split code paths."""
    if device.type != "cuda":
        return 4
    return 4 * sm_count(device)


def _scores(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            dropout_mask: Optional[Tensor], dropout_scale: float,
            act: Optional[Tensor] = None) -> Tensor:
    """Partial scores s_part (cdiv(Ch, SLOT), B*N) fp32 (sum over dim 0 = the scores, b2 in
    slot 0). With ``act`` ((B*N, Ch) fp32) also writes the activations into it."""
    B, N, C = x.shape
    Ch = w1.shape[0]
    M = B * N
    num_slots = triton.cdiv(Ch, _SLOT)
    s_part = torch.empty((num_slots, M), dtype=torch.float32, device=x.device)
    if w1.dtype != x.dtype:
        w1 = w1.to(x.dtype)
    mask = None
    if dropout_mask is not None:
        # bool -> uint8 is a free reinterpretation; rows of the flattened (M, Ch) mask
        mask = dropout_mask.reshape(M, Ch).contiguous().view(torch.uint8)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Ch, meta["BLOCK_N"]),)

    _sap_fwd_kernel[grid](
        x, w1, w2 if b1 is None else b1, w2, s_part if mask is None else mask, s_part,
        s_part if act is None else act,
        M, N, C, Ch, triton.next_power_of_2(M), num_slots,
        x.stride(0), x.stride(1), x.stride(2), w1.stride(0), w1.stride(1),
        float(dropout_scale),
        HAS_B1=b1 is not None, HAS_MASK=mask is not None, STORE_ACT=act is not None,
        DOT_PRECISION=_dot_precision(x.dtype), SLOT=_SLOT,
    )
    if b2 is not None:
        # b2 cancels in the softmax mathematically, but the contract adds it: a NaN / inf b2
        # poisons every score, as in the reference
        s_part[0].add_(b2.reshape(()).to(torch.float32))
    return s_part


def _pool_meta(kh: int, kw: int, C: int) -> Tuple[int, int, int]:
    """(WIN_P, BLOCK_C, num_warps) for the pooling kernels: the window's patches padded to a
    power of two, and as many channels as keep the tile near _POOL_TILE values."""
    win_p = max(2, triton.next_power_of_2(kh * kw))
    block_c = max(16, min(256, _POOL_TILE // win_p, triton.next_power_of_2(C)))
    num_warps = 8 if win_p * block_c > 4096 else 4
    return win_p, block_c, num_warps


@overload
def _vec(t: Tensor, dtype: torch.dtype) -> Tensor: ...
@overload
def _vec(t: None, dtype: torch.dtype) -> None: ...
def _vec(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1).to(dtype).contiguous()


def _empties(x: Tensor, n: int) -> Tuple[Any, ...]:
    # distinct objects: the op's alias check rejects one tensor returned twice, even empty
    return tuple(x.new_empty(0) for _ in range(n))


def sap_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            kh: int, kw: int, H: int, W: int, dropout_mask: Optional[Tensor],
            dropout_scale: float) -> Tensor:
    """Forward of the Triton backend: x (B, N, C) -> (B, G, C) in x's dtype.

    Same semantics as reference.sap_reference_fwd (b2 is added to every score: it cancels in
    the softmax, but a NaN / inf b2 must still poison the output, as the contract says).
    Launches: the scorer GEMM and the pooling kernel.
    """
    with _on_device(x):
        B, N, C = x.shape
        Gh, Gw = triton.cdiv(H, kh), triton.cdiv(W, kw)
        G = Gh * Gw
        s_part = _scores(x, w1, _vec(b1, x.dtype), _vec(w2, x.dtype), b2, dropout_mask,
                         dropout_scale)
        out = torch.empty((B, G, C), dtype=x.dtype, device=x.device)
        win_p, block_c, num_warps = _pool_meta(kh, kw, C)
        _sap_fwd_pool_kernel[(B * G,)](
            x, s_part, out, B * N, N, C, H, W, Gw, G, s_part.shape[0],
            x.stride(0), x.stride(1), x.stride(2),
            KH=kh, KW=kw, WIN_P=win_p, BLOCK_C=block_c, num_warps=num_warps,
        )
        return out


def sap_bwd(grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], kh: int, kw: int, H: int, W: int,
            dropout_mask: Optional[Tensor], dropout_scale: float, need_x: bool = True,
            need_w: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of the Triton backend; semantics of reference.sap_reference_bwd.

    grad_out: (B, G, C). Returns (dx (B, N, C), dw1 (Ch, C), db1 (Ch,), dw2 (Ch,), db2 (1,)),
    each in its input's dtype; dx is empty unless need_x, the weight gradients are empty
    unless need_w. db1 and db2 are returned even when b1 / b2 is None (the op drops them).
    Scratch: one (B*N, Ch) fp32 buffer (plus its copy in x's dtype for 16-bit x), freed on
    return.
    Launches: scorer GEMM (recompute), window backward, dz + reductions, then cuBLAS for
    dW1 and dx, and three small sums over the reduction partials.
    """
    with _on_device(x):
        B, N, C = x.shape
        Ch = w1.shape[0]
        M = B * N
        Gh, Gw = triton.cdiv(H, kh), triton.cdiv(W, kw)
        G = Gh * Gw
        if not (need_x or need_w):
            return _empties(x, 5)
        dev = x.device
        b1c, w2c = _vec(b1, x.dtype), _vec(w2, x.dtype)
        w1c = w1 if w1.dtype == x.dtype else w1.to(x.dtype)
        grad_out = grad_out.to(x.dtype).contiguous()

        # 1. recompute: scores, and the activations kept for dz / dw2
        # (fp32: a 16-bit activation would overflow at 65504 in float16 and round dw2's terms)
        act = torch.empty((M, Ch), dtype=torch.float32, device=dev)
        s_part = _scores(x, w1c, b1c, w2c, b2, dropout_mask, dropout_scale, act=act)

        # 2. window softmax backward: ds, and the direct term of dx
        ds = torch.empty((M,), dtype=torch.float32, device=dev)
        dx = torch.empty((B, N, C), dtype=x.dtype, device=dev) if need_x else ds
        win_p, block_c, num_warps = _pool_meta(kh, kw, C)
        _sap_bwd_pool_kernel[(B * G,)](
            x, s_part, grad_out, ds, dx, M, N, C, H, W, Gw, G, s_part.shape[0],
            x.stride(0), x.stride(1), x.stride(2),
            NEED_X=need_x, KH=kh, KW=kw, WIN_P=win_p, BLOCK_C=block_c, num_warps=num_warps,
        )

        # 3. dz over act in place, with the db1 / dw2 / db2 partial sums
        n_col = triton.cdiv(Ch, _DZ_BLOCK_N)
        splits = max(1, min(triton.cdiv(M, _DZ_BLOCK_M), triton.cdiv(_target_programs(dev), n_col)))
        rows_per_split = triton.cdiv(triton.cdiv(M, splits), _DZ_BLOCK_M) * _DZ_BLOCK_M
        splits = triton.cdiv(M, rows_per_split)
        part = torch.empty((splits, 2 * Ch + 1), dtype=torch.float32, device=dev) if need_w else ds
        scale = float(dropout_scale) if dropout_mask is not None else 1.0
        _sap_bwd_dz_kernel[(n_col, splits)](
            act, ds, w2c, part, M, Ch, rows_per_split, scale,
            NEED_W=need_w, BLOCK_M=_DZ_BLOCK_M, BLOCK_N=_DZ_BLOCK_N, num_warps=4,
        )
        # dz is an operand of the two GEMMs below, which run in x's dtype (16-bit tensor cores)
        dz = act if act.dtype == x.dtype else act.to(x.dtype)

        # 4. the two gradient GEMMs through the vendor BLAS
        if need_x:
            dx.view(M, C).addmm_(dz, w1c)
        else:
            (dx,) = _empties(x, 1)
        if need_w:
            dw1 = torch.mm(dz.t(), x.reshape(M, C)).to(w1.dtype)
            # three separate sums, not views of one: a custom op's outputs may not alias
            db1 = part[:, :Ch].sum(0).to(w1.dtype if b1 is None else b1.dtype)
            dw2 = part[:, Ch:2 * Ch].sum(0).to(w2.dtype)
            db2 = part[:, 2 * Ch:].sum(0).to(w2.dtype if b2 is None else b2.dtype)
            return dx, dw1, db1, dw2, db2
        return (dx, *_empties(x, 4))
