"""Triton kernels of ``flashsloth::query_patch_attention``: forward with split keys, backward.

The problem is few queries against many keys (EmbQ: 9 queries, 729 or 3645 patch keys,
32 heads, key head dim 18, value head dim 36), so the op is memory-bound: the time floor is
the bytes of q, k, v and out over the device bandwidth. The kernels stream every K/V block
exactly once and keep the queries' tile in registers.

Forward (flash-decoding): grid (B*H, query blocks, key splits). When B*H alone cannot fill
the GPU, the keys are split across programs; each writes a partial (lse, normalised out) in
fp32 and ``_attn_fwd_combine_kernel`` merges them. With no split the forward kernel writes
out and lse itself (one launch).

Backward: grid (B*H, key blocks). Lq is small, so one program per key block loops over all
query blocks (usually one), accumulating dk and dv in registers and writing its share of dq
to a per-key-block fp32 buffer; ``_attn_bwd_dq_reduce_kernel`` sums those shares in a fixed
order. No float atomics, so the gradients are deterministic. delta = rowsum(dO * out) is
recomputed by each program from the (tiny) out and dO rows instead of costing a launch.

Numerics follow docs/contract.md. Masked keys (key_padding_mask False, or past the end) get
probability 0 and their k / v rows are never read (loaded as 0), so NaN or garbage there cannot
reach any output; a row whose keys are all masked gets out = 0 and lse = +inf, and never a NaN:
exponentials are always taken against a finite reference (0 when the running max is still
-inf). A non-finite score at an attended key becomes NaN (s + 0 * s) and makes its row's out
and lse NaN.

Under TRITON_INTERPRET=1 the same code runs on CPU tensors (fp32 / fp16 only; the
interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _triton_utils
from .._triton_utils import device_guard as _device_guard
from .._triton_utils import dot_precision as _dot_precision
from .._triton_utils import pad_dim as _pad_dim
from .._triton_utils import sm_count as _sm_count

Tensor = torch.Tensor


_triton_utils.fix_interpreter_scalar_index()

# Softmax runs in base 2 (exp2 / log2): logits are pre-scaled by log2(e), lse is converted back
# with ln(2) (the kernels spell both constants out: Triton reads no Python globals).
_LOG2E = 1.4426950408889634

# Launch heuristics (tune on the GPU; the benchmark measures them).
# The SM count assumed when the tensors are not on a GPU (interpreter): an H100's.
# Split the keys only while fewer than this many (batch*head, query block) programs per SM
# exist; above it the GPU is already full and a split would only add the combine pass.
_SPLIT_BELOW_PROGRAMS_PER_SM = 2
# With a split, aim for about this many programs per SM (memory latency hiding).
_TARGET_PROGRAMS_PER_SM = 4
# Shared-memory budget (bytes) for the pipelined K/V tiles of one forward program; a
# fraction of the SM's 228 KB so that several programs fit on one SM.
_FWD_SMEM_BUDGET = 64 * 1024
_MAX_SPLITS = 128


def _fwd_config(lq: int, dk_pad: int, dv_pad: int, elem: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel.

    Chosen from sm_90 compiles (register count, no spills): 16-bit dots run on tensor cores
    with K/V tiles in shared memory; fp32 dots (input_precision="ieee") run on FMA units
    with their operands in registers, so fp32 gets smaller tiles.
    """
    wide = dk_pad + dv_pad
    if elem == 4:
        block_m = 16
        block_n = 64 if wide <= 128 else (32 if wide <= 256 else 16)
        num_warps = 4 if wide <= 128 else 8
    else:
        block_m = min(64, max(16, triton.next_power_of_2(lq)))
        block_n = 64 if wide <= 128 else 32
        num_warps = 4 if wide <= 128 and block_m <= 32 else 8
    # The K and V tiles of every pipeline stage live in shared memory.
    num_stages = 3 if 3 * block_n * wide * elem <= _FWD_SMEM_BUDGET else 2
    return block_m, block_n, num_warps, num_stages


def _bwd_config(dk_pad: int, dv_pad: int, elem: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward kernel (sm_90 compiles without spills).

    The dk, dv accumulators of BLOCK_N keys stay in registers; query blocks are looped over.
    """
    wide = dk_pad + dv_pad
    if elem == 4:
        block_n = 32 if wide <= 128 else 16
    else:
        block_n = 64 if wide <= 128 else (32 if wide <= 256 else 16)
    return 16, block_n, 8


def _choose_splits(programs: int, lk: int, block_n: int, device: torch.device) -> int:
    """Number of key splits so that about _TARGET_PROGRAMS_PER_SM programs run per SM.

    programs: (batch*heads) x (query blocks), the forward grid without a split.
    """
    n_sm = _sm_count(device)
    n_kblocks = triton.cdiv(lk, block_n)
    if programs >= _SPLIT_BELOW_PROGRAMS_PER_SM * n_sm or n_kblocks < 2:
        return 1
    want = triton.cdiv(_TARGET_PROGRAMS_PER_SM * n_sm, programs)
    return max(1, min(want, n_kblocks, _MAX_SPLITS))


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Mask, Out, Lse, PartO, PartLse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, keys_per_split, num_splits, qk_scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (batch*head, query block, key split) program: online softmax over its keys.

    qk_scale = scale * log2(e): the running max, sums and lse are kept in base 2 (exp2).
    stride_k{b,h,n} / stride_v{b,h,n} are in units of K_ALIGN / V_ALIGN elements.
    SPLIT: write (lse2, out normalised by its own sum) of this split to PartLse (B*H, S, Lq)
    and PartO (B*H, S, Lq, HEAD_DV), fp32; else write Out (q's dtype) and Lse (natural log).
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Lq
    dk_ok = offs_dk < HEAD_DK
    dv_ok = offs_dv < HEAD_DV

    q_ptrs = (Q + b * stride_qb + h * stride_qh
              + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dk_ok[None, :], other=0.0)

    # K/V row offsets are multiples of K_ALIGN / V_ALIGN elements (their strides arrive
    # divided by it): that lets Triton vectorise the loads (and pipeline them with cp.async)
    # for rows of 18 or 36 elements, whose strides are not multiples of 16.
    k_base = K + (b * stride_kb + h * stride_kh) * K_ALIGN
    v_base = V + (b * stride_vb + h * stride_vh) * V_ALIGN
    m_base = Mask + b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)

    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, Lk)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < end
        if HAS_MASK:
            attend = tl.load(m_base + offs_n * stride_mn, mask=key_ok, other=0)
            key_ok = key_ok & (attend != 0)
        # masked keys' rows are never read (loaded as 0): whatever they hold cannot reach out
        k = tl.load(k_base + (offs_n * stride_kn * K_ALIGN)[:, None] + offs_dk[None, :] * stride_kd,
                    mask=key_ok[:, None] & dk_ok[None, :], other=0.0)
        v = tl.load(v_base + (offs_n * stride_vn * V_ALIGN)[:, None] + offs_dv[None, :] * stride_vd,
                    mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # a non-finite score (q.k overflow, inf / NaN in q or k) at an attended key turns into
        # NaN, which then flows through l and acc: the row's out and lse become NaN (contract)
        s = s + 0.0 * s
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Exponents are taken against a finite reference: while every key seen so far is
        # masked, m_new is -inf and (-inf) - (-inf) would be NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # a row with no attended key has l = 0 exactly; a NaN l (non-finite score) stays NaN
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse2 = m_i + tl.log2(l_safe)
    if SPLIT:
        row = (pid_bh.to(tl.int64) * num_splits + pid_s) * Lq + offs_m
        tl.store(PartLse + row, tl.where(empty, float("-inf"), lse2), mask=row_ok)
        tl.store(PartO + row[:, None] * HEAD_DV + offs_dv[None, :], o,
                 mask=row_ok[:, None] & dv_ok[None, :])
    else:
        o_ptrs = (Out + b * stride_ob + h * stride_oh
                  + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
        lse = tl.where(empty, float("inf"), lse2 * 0.6931471805599453)
        tl.store(Lse + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_fwd_combine_kernel(
    PartO, PartLse, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, num_splits,
    HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, DV_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Merge the key splits' partial results of one (batch*head, query block).

    out = sum_s w_s o_s with w_s = 2^(lse2_s - LSE2), LSE2 = log2 sum_s 2^lse2_s. Splits
    with no attended key carry lse2_s = -inf (weight 0); if every split is empty the row
    gets out = 0 and lse = +inf.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Lq
    dv_ok = offs_dv < HEAD_DV

    base = pid_bh * num_splits * Lq
    lse_parts = tl.load(PartLse + base + offs_s[:, None] * Lq + offs_m[None, :],
                        mask=(offs_s[:, None] < num_splits) & row_ok[None, :],
                        other=float("-inf"))
    big = tl.max(lse_parts, 0)
    big_ref = tl.where(big == float("-inf"), 0.0, big)
    total = tl.sum(tl.exp2(lse_parts - big_ref[None, :]), 0)
    empty = total == 0.0  # NaN (a split with a non-finite score) is not empty: it propagates
    inv_total = 1.0 / tl.where(empty, 1.0, total)

    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for s in range(0, num_splits):
        row = base + s * Lq + offs_m
        lse_s = tl.load(PartLse + row, mask=row_ok, other=float("-inf"))
        w = tl.exp2(lse_s - big_ref) * inv_total
        o_s = tl.load(PartO + row[:, None] * HEAD_DV + offs_dv[None, :],
                      mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        acc += w[:, None] * o_s

    o_ptrs = (Out + b * stride_ob + h * stride_oh
              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    lse = tl.where(empty, float("inf"),
                   (big_ref + tl.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)
    tl.store(Lse + pid_bh * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask, Out, DO, Lse, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqm,
    H, Lq, Lk, sm_scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (batch*head, key block) program: dk, dv of its keys and its share of dq.

    p = exp(scale q.k - lse) (0 for masked keys and for rows with lse = +inf),
    dv = p^T dO, ds = p (dO v^T - delta), dk = scale ds^T q, dq_share = scale ds k.
    DQ: (B, H, n_key_blocks, Lq, HEAD_DK) fp32 shares (strides given; the last is 1), or,
    with a single key block, dq itself in q's dtype (stride_dqs unused).
    stride_k{b,h,n} / stride_v{b,h,n} are in units of K_ALIGN / V_ALIGN elements.
    """
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    dk_ok = offs_dk < HEAD_DK
    dv_ok = offs_dv < HEAD_DV
    key_ok = offs_n < Lk

    if HAS_MASK:
        attend = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=key_ok, other=0)
        key_ok = key_ok & (attend != 0)
    # masked keys' rows load as 0: their dk / dv are exactly 0 and dq never sees them
    k = tl.load(K + (b * stride_kb + h * stride_kh) * K_ALIGN
                + (offs_n * stride_kn * K_ALIGN)[:, None] + offs_dk[None, :] * stride_kd,
                mask=key_ok[:, None] & dk_ok[None, :], other=0.0)
    v = tl.load(V + (b * stride_vb + h * stride_vh) * V_ALIGN
                + (offs_n * stride_vn * V_ALIGN)[:, None] + offs_dv[None, :] * stride_vd,
                mask=key_ok[:, None] & dv_ok[None, :], other=0.0)

    q_base = Q + b * stride_qb + h * stride_qh
    o_base = Out + b * stride_ob + h * stride_oh
    g_base = DO + b * stride_gb + h * stride_gh
    dq_base = DQ + b * stride_dqb + h * stride_dqh + pid_n.to(tl.int64) * stride_dqs
    lse_base = Lse + pid_bh.to(tl.int64) * Lq
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, DK_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    for m0 in range(0, Lq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd,
                    mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
        g = tl.load(g_base + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                    mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        o = tl.load(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                    mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        # Rows past Lq read lse = +inf, so their p is 0 like an all-masked row's.
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.sum(g.to(tl.float32) * o.to(tl.float32), 1)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # s is finite (masked keys were loaded as 0), so s - (+inf) = -inf -> p = 0: no NaN.
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(g.dtype)), g, input_precision=DOT_PRECISION)
        dp = tl.dot(g, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
        dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * sm_scale
        tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_dk[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & dk_ok[None, :])

    # DK, DV: contiguous (B, H, Lk, D) buffers allocated by attn_bwd.
    kv_row = pid_bh.to(tl.int64) * Lk + offs_n
    store_ok = offs_n < Lk
    tl.store(DK + kv_row[:, None] * HEAD_DK + offs_dk[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok[:, None] & dk_ok[None, :])
    tl.store(DV + kv_row[:, None] * HEAD_DV + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=store_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attn_bwd_dq_reduce_kernel(
    DQPart, DQ, Lq, n_kblocks,
    HEAD_DK: tl.constexpr, BLOCK_M: tl.constexpr, DK_PAD: tl.constexpr,
):
    """dq[bh, m] = sum over key blocks of the fp32 shares, in block order (deterministic).

    DQPart: contiguous (B*H, n_kblocks, Lq, HEAD_DK) fp32; DQ: contiguous (B*H, Lq, HEAD_DK).
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, DK_PAD)
    ok = (offs_m < Lq)[:, None] & (offs_dk < HEAD_DK)[None, :]
    tile = offs_m[:, None] * HEAD_DK + offs_dk[None, :]
    acc = tl.zeros([BLOCK_M, DK_PAD], tl.float32)
    for j in range(0, n_kblocks):
        acc += tl.load(DQPart + (pid_bh * n_kblocks + j) * Lq * HEAD_DK + tile, mask=ok, other=0.0)
    tl.store(DQ + pid_bh * Lq * HEAD_DK + tile, acc.to(DQ.dtype.element_ty), mask=ok)


def _row_strides(t: Tensor) -> Tuple[int, int, int, int, int]:
    """(align, stride_b, stride_h, stride_n in units of align, stride_d) of a 4-D tensor.

    align: the largest power of two <= 16 bytes (in elements) dividing the batch, head and
    row strides, so every row starts on an align-element boundary (dims of size 1 never
    move, so their strides do not count).
    """
    strides = [s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3],
                                                          strict=True)]
    align = 16 // t.element_size()
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return (align, strides[0] // align, strides[1] // align, strides[2] // align, t.stride(3))


def _int32_rows(t: Tensor) -> Tensor:
    """t itself, or a contiguous copy when its in-head row offsets (row * stride) could pass
    int32: the kernels index rows with 32-bit products and only the (batch, head) base in
    64 bits. Copies only for extreme layouts (e.g. millions of keys interleaved with heads)."""
    if (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) < 2**31:
        return t
    return t.contiguous()


def _mask_args(key_padding_mask: Optional[Tensor], q: Tensor):
    """(pointer tensor, stride_b, stride_n, HAS_MASK). bool is read as uint8 (a view, no copy)."""
    if key_padding_mask is None:
        return q, 0, 0, False
    m = key_padding_mask
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
             *, num_splits: Optional[int] = None, block_n: Optional[int] = None
             ) -> Tuple[Tensor, Tensor]:
    """Forward of the query-to-patch attention on Triton.

    q: (B, H, Lq, Dk), k: (B, H, Lk, Dk), v: (B, H, Lk, Dv), any strides, one dtype
    (float32 / float16 / bfloat16); key_padding_mask: (B, Lk) bool, True = attend, or None;
    scale: logit scale. Returns out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32
    (+inf where every key of the row is masked; out is 0 there).

    num_splits / block_n override the launch heuristics (tests and tuning only): the keys
    are cut into num_splits ranges of ceil(Lk / num_splits) keys, streamed block_n at a time.
    Inputs are trusted: op.py validates them.
    """
    B, H, Lq, Dk = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    q, k, v = _int32_rows(q), _int32_rows(k), _int32_rows(v)
    dk_pad, dv_pad = _pad_dim(Dk), _pad_dim(Dv)
    block_m, bn, num_warps, num_stages = _fwd_config(Lq, dk_pad, dv_pad, q.element_size())
    if block_n is not None:
        bn = block_n
    n_mblocks = triton.cdiv(Lq, block_m)
    if num_splits is None:
        num_splits = _choose_splits(B * H * n_mblocks, Lk, bn, q.device)
        # Split boundaries on whole key blocks, so no block is read by two programs.
        keys_per_split = triton.cdiv(triton.cdiv(Lk, num_splits), bn) * bn
        num_splits = triton.cdiv(Lk, keys_per_split)
    else:
        keys_per_split = triton.cdiv(Lk, num_splits)

    out = torch.empty((B, H, Lq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    mask_t, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    split = num_splits > 1
    if split:
        part_o = torch.empty((B * H, num_splits, Lq, Dv), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B * H, num_splits, Lq), dtype=torch.float32, device=q.device)
    else:
        part_o, part_lse = out, lse
    k_align, *k_strides = _row_strides(k)
    v_align, *v_strides = _row_strides(v)
    with _device_guard(q):
        _attn_fwd_kernel[(B * H, n_mblocks, num_splits)](
            q, k, v, mask_t, out, lse, part_o, part_lse,
            *q.stride(), *k_strides, *v_strides, smb, smn, *out.stride(),
            H, Lq, Lk, keys_per_split, num_splits, scale * _LOG2E,
            HEAD_DK=Dk, HEAD_DV=Dv, K_ALIGN=k_align, V_ALIGN=v_align,
            HAS_MASK=has_mask, SPLIT=split,
            BLOCK_M=block_m, BLOCK_N=bn, DK_PAD=dk_pad, DV_PAD=dv_pad,
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=num_warps, num_stages=num_stages,
        )
        if split:
            _attn_fwd_combine_kernel[(B * H, n_mblocks)](
                part_o, part_lse, out, lse, *out.stride(), H, Lq, num_splits,
                HEAD_DV=Dv, BLOCK_M=block_m, DV_PAD=dv_pad,
                SPLITS_PAD=triton.next_power_of_2(num_splits),
                num_warps=4 if dv_pad <= 64 else 8,
            )
    return out, lse


def attn_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
             key_padding_mask: Optional[Tensor], scale: float, out: Tensor, lse: Tensor,
             *, block_n: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of the query-to-patch attention on Triton.

    grad_out, out: (B, H, Lq, Dv); q: (B, H, Lq, Dk); k: (B, H, Lk, Dk); v: (B, H, Lk, Dv),
    any strides; lse: (B, H, Lq) float32 from :func:`attn_fwd` (+inf on all-masked rows);
    key_padding_mask and scale as in the forward. Returns dq, dk, dv (contiguous, in the
    inputs' dtype), accumulated in fp32, deterministic (no atomics).

    block_n overrides the key block size (tests and tuning only).
    """
    B, H, Lq, Dk = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    q, k, v = _int32_rows(q), _int32_rows(k), _int32_rows(v)
    grad_out, out = _int32_rows(grad_out), _int32_rows(out)
    dk_pad, dv_pad = _pad_dim(Dk), _pad_dim(Dv)
    block_m, bn, num_warps = _bwd_config(dk_pad, dv_pad, q.element_size())
    if block_n is not None:
        bn = block_n
    n_kblocks = triton.cdiv(Lk, bn)

    dq = torch.empty((B, H, Lq, Dk), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, Dk), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Lk, Dv), dtype=v.dtype, device=q.device)
    lse = lse if lse.is_contiguous() else lse.contiguous()
    if n_kblocks == 1:
        # One key block: its dq share is the whole dq, written in place.
        dq_buf = dq
        dq_strides = (dq.stride(0), dq.stride(1), 0, dq.stride(2))
    else:
        dq_buf = torch.empty((B, H, n_kblocks, Lq, Dk), dtype=torch.float32, device=q.device)
        dq_strides = tuple(dq_buf.stride()[:4])  # type: ignore[assignment]
    mask_t, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    k_align, *k_strides = _row_strides(k)
    v_align, *v_strides = _row_strides(v)
    with _device_guard(q):
        _attn_bwd_dkdv_kernel[(B * H, n_kblocks)](
            q, k, v, mask_t, out, grad_out, lse, dq_buf, dk, dv,
            *q.stride(), *k_strides, *v_strides, smb, smn, *out.stride(), *grad_out.stride(),
            *dq_strides,
            H, Lq, Lk, scale,
            HEAD_DK=Dk, HEAD_DV=Dv, K_ALIGN=k_align, V_ALIGN=v_align, HAS_MASK=has_mask,
            BLOCK_M=block_m, BLOCK_N=bn, DK_PAD=dk_pad, DV_PAD=dv_pad,
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=num_warps, num_stages=1,
        )
        if n_kblocks > 1:
            _attn_bwd_dq_reduce_kernel[(B * H, triton.cdiv(Lq, block_m))](
                dq_buf, dq, Lq, n_kblocks,
                HEAD_DK=Dk, BLOCK_M=block_m, DK_PAD=dk_pad, num_warps=4 if dk_pad <= 64 else 8,
            )
    return dq, dk, dv
