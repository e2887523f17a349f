"""The ``cuda`` backend's kernels (csrc/sap, csrc/attention): on a GPU against the float64
reference in every dtype; everywhere through a CPU emulation of the CUDA execution model.

GPU tests (marker ``gpu``, skipped without CUDA) call the host functions of
flashsloth_kernels/{sap,attention}/fused_cuda.py directly: forward against the reference on
the op issues' shapes, split / chunk overrides, masking edge cases, non-contiguous inputs,
the current stream, and the C++ argument checks. The ops' own test files run the ``cuda``
backend through the public functions (forward and backward) once it is registered.

CPU tests check the loading logic (reasons, clear errors), and run the kernels *as written*
(the same .cu and .cuh files) under an emulation: a small set of fake CUDA headers maps each
block to real threads with barriers for __syncthreads, exchanges warp shuffles between warp
barriers (a shuffle outside warp-uniform code deadlocks, as it would misbehave on a GPU),
gives dynamic shared memory exactly the requested bytes, poisons it and every output with
NaN, and runs under AddressSanitizer (any out-of-bounds read or write fails). It catches
indexing, masking, split/merge and plan bugs; not races between warps that a GPU's timing
would expose (compute-sanitizer's racecheck does that: scripts/gpu_sanitize.sh).

Also a script:  python tests/test_cuda_kernels.py --sanitize-run   (the workload of
scripts/gpu_sanitize.sh), and --emu-run LIB WHICH (the emulation's workload, in a process
with AddressSanitizer preloaded).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashsloth_kernels import _cuda_ext
from flashsloth_kernels.attention.reference import query_patch_attention_reference
from flashsloth_kernels.sap.reference import num_windows, sap_reference
from flashsloth_kernels.testing import assert_close

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# SAP (B, H, W, C, Ch, (kh, kw), bias, dropout): the SAP issue's shapes (1x1 to 27x27 grids,
# partial edge windows, C 8 / 72 / 1152) plus odd C / Ch (scalar loads), no biases, a dropout
# mask and one large window.
SAP_CASES = [
    (1, 1, 1, 8, 8, (1, 1), True, False),
    (3, 2, 5, 8, 16, (2, 3), True, False),
    (3, 7, 7, 72, 72, (3, 3), True, False),
    (1, 7, 7, 8, 12, (4, 4), True, False),
    (3, 7, 5, 72, 40, (2, 2), False, False),
    (1, 5, 7, 72, 72, (2, 3), True, True),
    (2, 7, 5, 7, 13, (2, 2), True, False),
    (3, 27, 27, 8, 8, (3, 3), True, False),
    (2, 2, 5, 1152, 1152, (2, 2), True, False),
    (2, 27, 27, 1152, 1152, (3, 3), True, True),
    (1, 9, 9, 300, 20, (9, 9), True, False),
    (2, 3, 5, 16, 24, (4, 7), True, False),  # window larger than the grid: one partial window
]

# Attention (B, H, Lq, Lk, Dk, Dv, masked): the attention issue's shapes (EmbQ 9 x 729 and
# HD 3645 keys, heads 18 / 36, one query, one key) plus head dims 1 and 256 and Dk != Dv.
ATTN_CASES = [
    (2, 4, 9, 50, 18, 36, True),
    (3, 1, 1, 1, 18, 36, False),
    (3, 4, 17, 1, 7, 13, True),
    (2, 1, 17, 50, 64, 64, True),
    (1, 4, 1, 729, 7, 13, False),
    (1, 32, 9, 729, 18, 36, False),
    (2, 32, 9, 729, 18, 36, True),
    (1, 1, 9, 3645, 18, 36, True),
    (2, 32, 1, 3645, 18, 18, False),
    (1, 2, 3, 40, 1, 1, True),
    (1, 2, 16, 65, 256, 256, False),
    (2, 3, 33, 130, 5, 200, True),
]


def sap_id(c):
    B, H, W, C, Ch, (kh, kw), bias, drop = c
    return (f"B{B}-H{H}-W{W}-C{C}-Ch{Ch}-k{kh}x{kw}" + ("" if bias else "-nobias")
            + ("-drop" if drop else ""))


def attn_id(c):
    B, H, Lq, Lk, Dk, Dv, masked = c
    return f"B{B}-H{H}-Lq{Lq}-Lk{Lk}-d{Dk}x{Dv}" + ("-mask" if masked else "")


# Inputs and checks, shared by the GPU tests, the sanitizer workload and the emulation.

def make_sap_inputs(case, dtype, device):
    """Scores spread over a few units (the softmax is not flat); sample 0 of the dropout mask
    drops every unit of patch 0 (its score is then b2 alone)."""
    B, H, W, C, Ch, _, bias, drop = case
    x = torch.randn(B, H * W, C)
    w1 = torch.randn(Ch, C) * C ** -0.5
    b1 = torch.randn(Ch) * 0.1 if bias else None
    w2 = torch.randn(Ch) * 3.0 * Ch ** -0.5
    b2 = torch.randn(1) if bias else None
    mask = None
    if drop:
        mask = torch.rand(B, H * W, Ch) > 0.1
        mask[0, 0] = False
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(x), cast(w1), cast(b1), cast(w2), cast(b2),
            None if mask is None else mask.to(device), 1.0 / 0.9 if drop else 1.0)


def sap_expected(case, inputs):
    """(float64 reference, the reference at the inputs' precision): the expected value and the
    plain-PyTorch baseline of flashsloth_kernels.testing's criterion."""
    B, H, W, C, Ch, (kh, kw), _, _ = case
    x, w1, b1, w2, b2, mask, scale = inputs
    m = None if mask is None else mask.cpu()
    d = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    c = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return (sap_reference(d(x), d(w1), d(b1), d(w2), d(b2), kh, kw, H, W, m, scale),
            sap_reference(c(x), c(w1), c(b1), c(w2), c(b2), kh, kw, H, W, m, scale))


def make_attn_inputs(case, dtype, device, all_masked_sample=True):
    """Random q, k, v; with a mask ~30% of keys are masked, and (B > 1) sample 1 has every key
    masked (its rows must give out = 0, lse = +inf)."""
    B, H, Lq, Lk, Dk, Dv, masked = case
    q = torch.randn(B, H, Lq, Dk).to(device=device, dtype=dtype)
    k = torch.randn(B, H, Lk, Dk).to(device=device, dtype=dtype)
    v = torch.randn(B, H, Lk, Dv).to(device=device, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(B, Lk) > 0.3
        mask[0, 0] = True
        if B > 1 and all_masked_sample:
            mask[1] = False
        mask = mask.to(device)
    return q, k, v, mask, 2.0 * Dk ** -0.5


def check_attn(name, out, lse, q, k, v, mask, scale):
    """out against the float64 reference by the criterion of flashsloth_kernels.testing (lse:
    fp32 precision), with +inf
    exactly where the reference has it (rows with no attended key, whose out must be 0)."""
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    c = lambda t: t.detach().cpu()  # noqa: E731
    m = None if mask is None else mask.cpu()
    ref_out, ref_lse = query_patch_attention_reference(d(q), d(k), d(v), m, scale)
    base_out, base_lse = query_patch_attention_reference(c(q), c(k), c(v), m, scale)
    assert out.dtype == q.dtype and out.shape == ref_out.shape, name
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, name
    out, lse = out.cpu(), lse.cpu()
    assert_close(f"{name} out", out, ref_out, base_out, q.dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{name} lse: +inf rows differ"
    assert bool((lse[~finite] == math.inf).all()), f"{name} lse: expected +inf on masked rows"
    assert bool((out[~finite] == 0).all()), f"{name} out: expected 0 on all-masked rows"
    assert_close(f"{name} lse", lse[finite], ref_lse[finite], base_lse[finite], torch.float32)


def sap_cuda():
    from flashsloth_kernels.sap import fused_cuda

    return fused_cuda


def attn_cuda():
    from flashsloth_kernels.attention import fused_cuda

    return fused_cuda


# GPU: the compiled kernels.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", SAP_CASES, ids=sap_id)
def test_sap_forward_matches_reference(case, dtype):
    inputs = make_sap_inputs(case, dtype, "cuda")
    B, H, W, C, Ch, (kh, kw), _, _ = case
    out = sap_cuda().sap_fwd(*inputs[:5], kh, kw, H, W, *inputs[5:])
    assert out.dtype == dtype and out.shape == (B, num_windows(H, W, kh, kw), C)
    assert_close(f"sap {sap_id(case)}", out.cpu(), *sap_expected(case, inputs), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_sap_images_per_chunk(chunk):
    case = (5, 7, 7, 72, 72, (3, 3), True, True)
    inputs = make_sap_inputs(case, torch.float32, "cuda")
    out = sap_cuda().sap_fwd(*inputs[:5], 3, 3, 7, 7, *inputs[5:], images_per_chunk=chunk)
    assert_close(f"sap chunk {chunk}", out.cpu(), *sap_expected(case, inputs), torch.float32)


@pytest.mark.gpu
def test_sap_strided_inputs_and_empty_batch():
    case = (3, 7, 7, 72, 40, (3, 3), True, False)
    x, w1, b1, w2, b2, mask, scale = make_sap_inputs(case, torch.float32, "cuda")
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)       # (B, N, C), channels-first storage
    w1s = w1.t().contiguous().t()
    w2s = torch.stack([w2, w2], 1)[:, 0]                      # stride 2
    out = sap_cuda().sap_fwd(xs, w1s, b1, w2s, b2, 3, 3, 7, 7, mask, scale)
    assert_close("sap strided", out.cpu(), *sap_expected(case, (x, w1, b1, w2, b2, mask, scale)),
                 torch.float32)
    empty = sap_cuda().sap_fwd(x[:0], w1, b1, w2, b2, 3, 3, 7, 7, None, 1.0)
    assert empty.shape == (0, 9, 72)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ATTN_CASES, ids=attn_id)
def test_attention_forward_matches_reference(case, dtype, masked):
    case = case[:6] + (masked,)
    q, k, v, mask, scale = make_attn_inputs(case, dtype, "cuda")
    out, lse = attn_cuda().attn_fwd(q, k, v, mask, scale)
    check_attn(attn_id(case), out, lse, q, k, v, mask, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 2, 7, 128])
def test_attention_split_override(num_splits):
    """Every split count gives the reference's answer, including ranges with no attended key
    (a split of a sample whose keys are masked there) and more splits than key tiles."""
    case = (2, 3, 17, 200, 18, 36, True)
    q, k, v, mask, scale = make_attn_inputs(case, torch.float32, "cuda")
    mask[0, :150] = False
    out, lse = attn_cuda().attn_fwd(q, k, v, mask, scale, num_splits=num_splits)
    check_attn(f"splits {num_splits}", out, lse, q, k, v, mask, scale)


@pytest.mark.gpu
def test_attention_strided_inputs():
    B, H, Lq, Lk, Dk, Dv = 2, 4, 9, 100, 18, 36
    q = torch.randn(B, Lq, H, Dk, device="cuda").transpose(1, 2)     # (B, H, Lq, Dk) views
    k = torch.randn(B, Lk, H, Dk, device="cuda").transpose(1, 2)
    v = torch.randn(B, Lk, H, 2 * Dv, device="cuda").transpose(1, 2)[..., ::2]
    mask = (torch.rand(B, 2 * Lk, device="cuda") > 0.3)[:, ::2]
    out, lse = attn_cuda().attn_fwd(q, k, v, mask, 0.25)
    check_attn("strided", out, lse, q, k, v, mask, 0.25)


@pytest.mark.gpu
def test_kernels_use_the_current_stream():
    """The kernels run on torch's current stream: work queued on a side stream, read after a
    wait, matches the reference (a kernel on the default stream would race the inputs)."""
    side = torch.cuda.Stream()
    case = (2, 32, 9, 729, 18, 36, True)
    with torch.cuda.stream(side):
        q, k, v, mask, scale = make_attn_inputs(case, torch.bfloat16, "cuda")
        out, lse = attn_cuda().attn_fwd(q, k, v, mask, scale)
        sap_case = (2, 27, 27, 72, 72, (3, 3), True, False)
        inputs = make_sap_inputs(sap_case, torch.bfloat16, "cuda")
        pooled = sap_cuda().sap_fwd(*inputs[:5], 3, 3, 27, 27, *inputs[5:])
    torch.cuda.current_stream().wait_stream(side)
    check_attn("side stream", out, lse, q, k, v, mask, scale)
    assert_close("sap side stream", pooled.cpu(), *sap_expected(sap_case, inputs), torch.bfloat16)


@pytest.mark.gpu
def test_device_guard_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    case = (2, 4, 9, 50, 18, 36, True)
    q, k, v, mask, scale = make_attn_inputs(case, torch.float32, "cuda:1")
    with torch.cuda.device(0):
        out, lse = attn_cuda().attn_fwd(q, k, v, mask, scale)
    assert out.device == q.device
    check_attn("cuda:1", out, lse, q, k, v, mask, scale)


@pytest.mark.gpu
def test_cpp_checks_name_the_argument():
    ops = _cuda_ext.ops()
    x, w1, b1, w2, b2, _, _ = make_sap_inputs((1, 3, 3, 8, 8, (3, 3), True, False),
                                              torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="w1: expected shape"):
        ops.spatial_attention_pool_fwd(x, w1[:, :4], b1, w2, b2, 3, 3, 3, 3, None, 1.0)
    with pytest.raises(RuntimeError, match="w2: expected dtype"):
        ops.spatial_attention_pool_fwd(x, w1, b1, w2.half(), b2, 3, 3, 3, 3, None, 1.0)
    with pytest.raises(RuntimeError, match="x: expected a CUDA tensor"):
        ops.spatial_attention_pool_fwd(x.cpu(), w1, b1, w2, b2, 3, 3, 3, 3, None, 1.0)
    with pytest.raises(RuntimeError, match="kh, kw"):
        ops.spatial_attention_pool_fwd(x, w1, b1, w2, b2, 0, 3, 3, 3, None, 1.0)
    q, k, v, mask, _ = make_attn_inputs((2, 2, 3, 10, 8, 8, True), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="key_padding_mask: expected dtype bool"):
        ops.query_patch_attention_fwd(q, k, v, mask.float(), 1.0, 0)
    with pytest.raises(RuntimeError, match="v: expected shape"):
        ops.query_patch_attention_fwd(q, k, v[:, :, :5], None, 1.0, 0)
    with pytest.raises(RuntimeError, match="head dim Dk"):
        z = lambda *shape: torch.zeros(*shape, device="cuda")  # noqa: E731
        ops.query_patch_attention_fwd(z(1, 1, 1, 257), z(1, 1, 2, 257), z(1, 1, 2, 4), None, 1.0, 0)
    with pytest.raises(RuntimeError, match="num_splits"):
        ops.query_patch_attention_fwd(q, k, v, None, 1.0, 129)
    with pytest.raises(RuntimeError, match="scale"):
        ops.query_patch_attention_fwd(q, k, v, None, float("nan"), 0)


@pytest.mark.gpu
def test_public_ops_forward_and_backward_on_cuda_backend():
    """Through the registered ops: forward on the CUDA kernels, backward delegated to Triton."""
    from flashsloth_kernels import query_patch_attention, spatial_attention_pool

    x, w1, b1, w2, b2, _, _ = make_sap_inputs((2, 7, 7, 72, 72, (3, 3), True, False),
                                              torch.float32, "cuda")
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    out = spatial_attention_pool(*leaves, window=3, backend="cuda")
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    q, k, v, mask, scale = make_attn_inputs((2, 32, 9, 729, 18, 36, True), torch.float32, "cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = query_patch_attention(*leaves, mask, scale, backend="cuda")
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


# Everywhere: loading and reasons.

def test_cuda_reasons_on_cpu_are_cheap_and_complete(monkeypatch):
    """CPU inputs are turned away without loading (or JIT-building) the extension."""
    def must_not_load():
        raise AssertionError("cuda_reasons loaded the extension for a CPU tensor")

    monkeypatch.setattr(_cuda_ext, "_load", must_not_load)
    why = _cuda_ext.cuda_reasons(torch.device("cpu"), torch.float64)
    assert any("needs CUDA tensors" in w for w in why)
    assert any("float64 is not supported" in w for w in why)


def test_sources_match_setup_py_globs():
    names = sorted(p.relative_to(ROOT).as_posix() for p in _cuda_ext.sources())
    cu = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("csrc/**/*.cu"))
    binding = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("csrc/**/*_cuda.cpp"))
    assert names == sorted(cu + binding)
    assert {"csrc/sap/sap_fwd.cu", "csrc/attention/attention_fwd.cu",
            "csrc/sap/sap_cuda.cpp", "csrc/attention/attention_cuda.cpp"} <= set(names)
    # the CPU build (csrc/<op>/*_cpu.cpp) must not pick up CUDA sources
    assert not any(n.endswith("_cpu.cpp") for n in names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_host_functions_raise_the_reason_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA extension"):
        sap_cuda().sap_fwd(*make_sap_inputs(SAP_CASES[0], torch.float32, "cpu")[:5],
                           1, 1, 1, 1, None, 1.0)
    with pytest.raises(RuntimeError, match="CUDA extension"):
        attn_cuda().attn_fwd(*make_attn_inputs(ATTN_CASES[0], torch.float32, "cpu")[:3], None, 1.0)


# Everywhere: the kernels under the CPU emulation of CUDA.

_EMU_CORE = r"""
// CPU emulation of the CUDA execution model used by the flashsloth kernels (see the test
// module's docstring). Blocks run one after another; a block's threads run concurrently.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct emu_uint3 { unsigned int x = 0, y = 0, z = 0; };

namespace emu {
inline thread_local emu_uint3 tl_thread;
inline thread_local emu_uint3 tl_block;
inline dim3 g_block_dim, g_grid_dim;
inline std::barrier<>* g_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
inline std::vector<float> g_shfl;
inline unsigned char* g_dyn_smem = nullptr;
inline int g_smem_optin = 227 * 1024;
inline int g_launch_error = 0;
inline std::map<const void*, int> g_optin;  // kernel -> opted-in dynamic shared memory bytes
}  // namespace emu

#define threadIdx (emu::tl_thread)
#define blockIdx (emu::tl_block)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

inline void __syncthreads() { emu::g_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned int = 0xffffffffu) {
  emu::g_warp_barriers[threadIdx.x / 32]->arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned int, float v, int off) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  emu::g_shfl[warp * 32 + lane] = v;
  emu::g_warp_barriers[warp]->arrive_and_wait();
  const float r = emu::g_shfl[warp * 32 + (lane ^ off)];
  emu::g_warp_barriers[warp]->arrive_and_wait();
  return r;
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;

template <typename T>
T* emu_dynamic_smem() { return reinterpret_cast<T*>(emu::g_dyn_smem); }

typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidDevice = 101 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute, int bytes) {
  if (bytes > emu::g_smem_optin) return cudaErrorInvalidValue;
  emu::g_optin[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 132 : emu::g_smem_optin;
  return cudaSuccess;
}

namespace emu {
template <typename Kernel>
struct Launcher {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const {
    // what a GPU rejects at launch
    if (block.x % 32 != 0 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.x == 0 ||
        grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
        (smem > 48 * 1024 && !opted_in(smem))) {
      g_launch_error = 1;
      return;
    }
    g_block_dim = block;
    g_grid_dim = grid;
    const int nthreads = static_cast<int>(block.x);
    std::barrier<> block_barrier(nthreads);
    g_block_barrier = &block_barrier;
    g_warp_barriers.clear();
    for (int w = 0; w < nthreads / 32; ++w) g_warp_barriers.emplace_back(new std::barrier<>(32));
    g_shfl.assign(nthreads, 0.f);
    std::unique_ptr<unsigned char[]> dyn(new unsigned char[smem > 0 ? smem : 1]);
    std::memset(dyn.get(), 0xff, smem > 0 ? smem : 1);  // NaN until written
    g_dyn_smem = smem > 0 ? dyn.get() : nullptr;
    std::vector<std::thread> threads;
    for (int t = 0; t < nthreads; ++t) {
      threads.emplace_back([&, t]() {
        tl_thread.x = t;
        for (unsigned int bz = 0; bz < grid.z; ++bz)
          for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
              tl_block.x = bx; tl_block.y = by; tl_block.z = bz;
              kernel(args...);
              block_barrier.arrive_and_wait();  // the next block reuses shared memory
            }
      });
    }
    for (auto& th : threads) th.join();
    g_dyn_smem = nullptr;
  }
  // more than 48 KB of dynamic shared memory needs cudaFuncSetAttribute on this kernel first
  bool opted_in(size_t bytes) const {
    auto it = g_optin.find(reinterpret_cast<const void*>(kernel));
    return it != g_optin.end() && static_cast<size_t>(it->second) >= bytes;
  }
};
template <typename Kernel>
Launcher<Kernel> launcher(Kernel k, dim3 grid, dim3 block, size_t smem = 0,
                          cudaStream_t = nullptr) {
  return Launcher<Kernel>{k, grid, block, smem};
}
}  // namespace emu
"""

_EMU_HEADERS = {
    "cuda_runtime_api.h": '#pragma once\n#include "cuda_emu_core.h"\n',
    "cuda_runtime.h": '#pragma once\n#include "cuda_emu_core.h"\n',
    "cuda_fp16.h": r"""#pragma once
#include "cuda_emu_core.h"
struct __half { _Float16 v; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
""",
    "cuda_bf16.h": r"""#pragma once
#include "cuda_emu_core.h"
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
""",
}

# C entry points over the real launchers (the binding's logic around them is mirrored in
# Python below: the GEMM, chunking, the plan's buffers).
_EMU_HARNESS = r"""
#include "sap_cuda.cuh"
#include "attention_cuda.cuh"
using namespace flashsloth_cuda;
extern "C" {
int emu_sap_epilogue(int dtype, void* z, void* x, void* b1, void* w2, void* b2, void* mask,
                     float dropout_scale, void* out, long B, int H, int W, int C, int Ch, int kh,
                     int kw) {
  SapEpilogueArgs a{};
  a.z = static_cast<const float*>(z); a.x = x; a.b1 = b1; a.w2 = w2; a.b2 = b2;
  a.dropout_mask = static_cast<const uint8_t*>(mask); a.dropout_scale = dropout_scale;
  a.out = out; a.B = B; a.H = H; a.W = W; a.C = C; a.Ch = Ch; a.kh = kh; a.kw = kw;
  emu::g_launch_error = 0;
  const int err = sap_fwd_epilogue_launch(static_cast<Dtype>(dtype), a, nullptr);
  return err ? err : (emu::g_launch_error ? 1000 : 0);
}
int emu_attn_plan(long BH, int Lq, int Lk, int Dk, int Dv, int req, int sm, int smem, long* o) {
  const AttnFwdPlan p = attn_fwd_make_plan(BH, Lq, Lk, Dk, Dv, req, sm, smem);
  o[0] = p.block_m; o[1] = p.block_n; o[2] = p.m_blocks; o[3] = p.num_splits;
  o[4] = p.keys_per_split; o[5] = p.rows_per_thread; o[6] = (long)p.smem_bytes;
  o[7] = attn_pv_groups(Dv);
  return 0;
}
int emu_attn_fwd(int dtype, void* q, void* k, void* v, void* mask, void* out, float* lse,
                 float* part_o, float* part_lse, long BH, int H, int Lq, int Lk, int Dk, int Dv,
                 float qk_scale_log2, int req, int sm, int smem) {
  const AttnFwdPlan p = attn_fwd_make_plan(BH, Lq, Lk, Dk, Dv, req, sm, smem);
  emu::g_smem_optin = smem;
  AttnFwdArgs a{};
  a.q = q; a.k = k; a.v = v; a.mask = static_cast<const uint8_t*>(mask);
  a.BH = BH; a.H = H; a.Lq = Lq; a.Lk = Lk; a.Dk = Dk; a.Dv = Dv; a.qk_scale_log2 = qk_scale_log2;
  if (p.num_splits == 1) {
    a.out = out; a.lse = lse;
  } else {
    a.part_o = part_o; a.part_lse = part_lse;
  }
  emu::g_launch_error = 0;
  int err = attn_fwd_launch(static_cast<Dtype>(dtype), a, p, nullptr);
  if (err || emu::g_launch_error) return err ? err : 1000;
  if (p.num_splits == 1) return 0;
  AttnCombineArgs c{};
  c.part_o = part_o; c.part_lse = part_lse; c.out = out; c.lse = lse; c.BH = BH; c.Lq = Lq;
  c.Dv = Dv; c.num_splits = p.num_splits;
  err = attn_fwd_combine_launch(static_cast<Dtype>(dtype), c, nullptr);
  return err ? err : (emu::g_launch_error ? 1000 : 0);
}
}
"""

_EMU_PROBE = r"""
#include <barrier>
#include <thread>
int main() { std::barrier<> b(2); std::thread t([&] { b.arrive_and_wait(); });
  b.arrive_and_wait(); t.join(); _Float16 h = static_cast<_Float16>(1.5f); return h > 1 ? 0 : 1; }
"""


def _rewrite_cuda_source(text: str) -> str:
    """The two constructs plain C++ lacks: dynamic shared memory and <<<...>>> launches."""
    text = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];",
                  r"\1* \2 = emu_dynamic_smem<\1>();", text)
    return re.sub(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\(", r"emu::launcher(\1, \2)(", text,
                  flags=re.S)


def _cxx() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _asan_runtime(cxx: str) -> str | None:
    """The AddressSanitizer runtime to preload into Python (None: build without it)."""
    try:
        path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True,
                              text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def build_emulation(workdir: Path) -> tuple[Path, str | None]:
    """Compile the kernels' sources with the fake CUDA headers into a shared library.

    Returns (library, AddressSanitizer runtime or None). Skips (pytest) when the host
    compiler lacks what the emulation needs (C++20 <barrier>, _Float16); a compile error in
    the kernel sources themselves fails.
    """
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler for the CUDA emulation")
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / "probe.cpp"
    probe.write_text(_EMU_PROBE)
    res = subprocess.run([cxx, "-std=c++20", "-pthread", str(probe), "-o", str(workdir / "probe")],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"the host compiler cannot build the CUDA emulation (C++20 <barrier>, "
                    f"_Float16): {res.stderr[-500:]}")
    asan = _asan_runtime(cxx)
    fake = workdir / "fake"
    src = workdir / "src"
    fake.mkdir(exist_ok=True)
    src.mkdir(exist_ok=True)
    (fake / "cuda_emu_core.h").write_text(_EMU_CORE)
    for name, text in _EMU_HEADERS.items():
        (fake / name).write_text(text)
    digest = hashlib.sha256((_EMU_CORE + _EMU_HARNESS + str(asan)).encode())
    (src / "common").mkdir(exist_ok=True)
    shared = sorted(ROOT.glob("csrc/common/*.cuh")) + sorted(ROOT.glob("csrc/common/*.h"))
    ops = sorted(ROOT.glob("csrc/sap/*.cu*")) + sorted(ROOT.glob("csrc/attention/*.cu*"))
    for path in ops + shared:
        text = _rewrite_cuda_source(path.read_text())
        dest = src / "common" / path.name if path.parent.name == "common" else src / path.name
        dest.write_text(text)
        digest.update(path.name.encode() + text.encode())
    (src / "harness.cpp").write_text(_EMU_HARNESS)
    lib = workdir / f"libemu-{digest.hexdigest()[:16]}.so"
    if lib.exists():
        return lib, asan
    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-pthread", f"-I{fake}", f"-I{src}"]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    units = [("sap_fwd.cu", True), ("attention_fwd.cu", True), ("harness.cpp", False)]
    procs = []
    for name, is_cuda in units:
        cmd = [cxx, *flags] + (["-x", "c++"] if is_cuda else []) + ["-c", str(src / name),
                                                                    "-o", str(src / (name + ".o"))]
        procs.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True)))
    errors = []
    for name, proc in procs:
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            errors.append(f"{name}:\n{out[-4000:]}")
    assert not errors, "the kernels do not compile under the CUDA emulation:\n" + "\n".join(errors)
    link = [cxx, "-shared", "-pthread", *(["-fsanitize=address"] if asan else []),
            *(str(src / (n + ".o")) for n, _ in units), "-o", str(lib)]
    res = subprocess.run(link, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return lib, asan


@pytest.fixture(scope="session")
def emulation(tmp_path_factory):
    return build_emulation(tmp_path_factory.mktemp("cuda_emu"))


def _run_emulation(emulation, which: str, timeout: int = 1200):
    lib, asan = emulation
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if asan:
        env["LD_PRELOAD"] = asan
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0"
    res = subprocess.run([sys.executable, __file__, "--emu-run", str(lib), which], env=env,
                         capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"emulated {which} failed (rc {res.returncode}):\n{tail}"
    assert "EMU OK" in res.stdout, tail


def test_emulated_launch_plan(emulation):
    _run_emulation(emulation, "plan")


def test_emulated_sap_kernel(emulation):
    _run_emulation(emulation, "sap")


def test_emulated_attention_kernels(emulation):
    _run_emulation(emulation, "attn")


@pytest.mark.slow
def test_emulated_kernels_every_case(emulation):
    _run_emulation(emulation, "all", timeout=3600)


# The emulation's workload (runs in a child process, under AddressSanitizer when available).

_EMU_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


class _Emulated:
    """The cuda backend's host functions, with the C++ binding's logic mirrored around the
    real launchers (torch CPU matmul stands in for cuBLAS)."""

    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)

    def plan(self, BH, Lq, Lk, Dk, Dv, req=0, sm=132, smem=227 * 1024):
        o = (ctypes.c_long * 8)()
        self.lib.emu_attn_plan(ctypes.c_long(BH), Lq, Lk, Dk, Dv, req, sm, smem, o)
        keys = ("block_m", "block_n", "m_blocks", "num_splits", "keys_per_split",
                "rows_per_thread", "smem_bytes", "pv_groups")
        return dict(zip(keys, list(o)))

    def sap_fwd(self, x, w1, b1, w2, b2, kh, kw, H, W, mask, scale, images_per_chunk=0):
        B, N, C = x.shape
        Ch = w1.shape[0]
        out = torch.full((B, num_windows(H, W, kh, kw), C), math.nan, dtype=x.dtype)
        chunk = min(images_per_chunk or B, B)
        xc = x.contiguous()
        # z is fp32 for every dtype, as in sap_cuda.cpp (16-bit operands, fp32 products)
        z = torch.full((chunk * N, Ch), math.nan, dtype=torch.float32)
        for b0 in range(0, B, chunk):
            nb = min(chunk, B - b0)
            zc = z[: nb * N]
            torch.mm(xc[b0:b0 + nb].reshape(nb * N, C).float(), w1.t().float(), out=zc)
            err = self.lib.emu_sap_epilogue(
                _EMU_DTYPE[x.dtype], _ptr(zc), _ptr(xc[b0:]), _ptr(b1), _ptr(w2.contiguous()),
                _ptr(b2), _ptr(None if mask is None else mask[b0:].contiguous()),
                ctypes.c_float(scale), _ptr(out[b0:]), ctypes.c_long(nb), H, W, C, Ch, kh, kw)
            assert err == 0, f"sap launcher error {err}"
        return out

    def attn_fwd(self, q, k, v, mask, scale, num_splits=0, sm=132, smem=227 * 1024):
        B, H, Lq, Dk = q.shape
        Lk, Dv = k.shape[2], v.shape[3]
        S = self.plan(B * H, Lq, Lk, Dk, Dv, num_splits, sm, smem)["num_splits"]
        out = torch.full((B, H, Lq, Dv), math.nan, dtype=q.dtype)
        lse = torch.full((B, H, Lq), math.nan)
        part_o = torch.full((B * H, S, Lq, Dv), math.nan) if S > 1 else None
        part_lse = torch.full((B * H, S, Lq), math.nan) if S > 1 else None
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        mc = None if mask is None else mask.contiguous()
        err = self.lib.emu_attn_fwd(
            _EMU_DTYPE[q.dtype], _ptr(qc), _ptr(kc), _ptr(vc), _ptr(mc), _ptr(out), _ptr(lse),
            _ptr(part_o), _ptr(part_lse), ctypes.c_long(B * H), H, Lq, Lk, Dk, Dv,
            ctypes.c_float(scale * math.log2(math.e)), num_splits, sm, smem)
        assert err == 0, f"attention launcher error {err}"
        return out, lse


def _emu_plan_checks(emu: _Emulated) -> None:
    """Invariants of the launch plan over head dims 1..256 and the shapes that matter."""
    for Dk in (1, 7, 18, 64, 100, 255, 256):
        for Dv in (1, 13, 36, 128, 256):
            for Lq in (1, 9, 16, 17, 100):
                for smem in (99 * 1024, 163 * 1024, 227 * 1024):
                    p = emu.plan(64, Lq, 729, Dk, Dv, smem=smem)
                    assert 0 < p["smem_bytes"] <= smem, (Dk, Dv, Lq, smem, p)
                    assert p["block_m"] == min(Lq, 16) and p["block_n"] in (16, 32, 64, 128)
                    assert p["rows_per_thread"] in (1, 2, 4, 8)
                    assert p["rows_per_thread"] * p["pv_groups"] >= p["block_m"]
                    assert p["pv_groups"] * -(-Dv // 4) <= 128
                    assert p["m_blocks"] * p["block_m"] >= Lq
    # EmbQ at batch 1 (32 heads): keys split across about 4 blocks per SM on 132 SMs.
    p = emu.plan(32, 9, 729, 18, 36)
    assert p["num_splits"] == 12 and p["keys_per_split"] == 64, p
    # batch 64: 2048 blocks already fill the GPU; no split, one launch, 128-key tiles.
    p = emu.plan(2048, 9, 729, 18, 36)
    assert p["num_splits"] == 1 and p["block_n"] == 128, p
    # a requested split count covers Lk with ranges of ceil(Lk / n) keys, at most n of them
    for Lk, req in ((5, 4), (729, 7), (1, 3), (200, 128)):
        p = emu.plan(2, 3, Lk, 8, 8, req)
        assert p["keys_per_split"] == -(-Lk // req) and p["num_splits"] <= req
        covered = p["num_splits"] * p["keys_per_split"]
        assert covered - p["keys_per_split"] < Lk <= covered


_EMU_SAP_QUICK = ([SAP_CASES[i] for i in (1, 2, 5, 6)] + [(1, 6, 6, 1152, 1152, (3, 3), True, False)]
                  + SAP_CASES[-1:])
_EMU_ATTN_QUICK = [  # (case, num_splits, sm_count, smem opt-in)
    ((1, 4, 9, 729, 18, 36, False), 0, 132, 227 * 1024),    # EmbQ batch 1: split + combine
    ((2, 3, 9, 100, 18, 36, True), 0, 132, 227 * 1024),      # sample 1 all masked
    ((2, 3, 17, 70, 5, 9, True), 5, 132, 227 * 1024),        # two query blocks, requested split
    ((2, 2, 17, 130, 7, 13, True), 0, 1, 227 * 1024),        # no split: one launch
    ((1, 2, 3, 40, 1, 1, True), 0, 132, 227 * 1024),
    ((1, 1, 3, 50, 256, 256, False), 0, 132, 99 * 1024),     # large dims, smaller opt-in
]


def _emu_sap(emu: _Emulated, cases, dtypes=DTYPES) -> None:
    for dtype in dtypes:
        for case in cases:
            B, H, W, C, Ch, (kh, kw), _, _ = case
            inputs = make_sap_inputs(case, dtype, "cpu")
            out = emu.sap_fwd(*inputs[:5], kh, kw, H, W, *inputs[5:])
            assert_close(f"emulated sap {sap_id(case)} {dtype}", out, *sap_expected(case, inputs),
                         dtype)
        case = (5, 7, 7, 24, 24, (3, 3), True, True)
        inputs = make_sap_inputs(case, dtype, "cpu")
        out = emu.sap_fwd(*inputs[:5], 3, 3, 7, 7, *inputs[5:], images_per_chunk=2)
        assert_close(f"emulated sap chunked {dtype}", out, *sap_expected(case, inputs), dtype)
        print(f"sap {dtype}: ok", flush=True)


def _emu_attn(emu: _Emulated, cases, dtypes=DTYPES) -> None:
    for dtype in dtypes:
        for case, req, sm, smem in cases:
            q, k, v, mask, scale = make_attn_inputs(case, dtype, "cpu")
            out, lse = emu.attn_fwd(q, k, v, mask, scale, req, sm, smem)
            check_attn(f"emulated attention {attn_id(case)} splits={req} sm={sm} {dtype}",
                       out, lse, q, k, v, mask, scale)
        q, k, v, mask, scale = make_attn_inputs((2, 3, 5, 40, 9, 11, True), dtype, "cpu")
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        out, lse = emu.attn_fwd(q, k, v, mask, scale)
        check_attn(f"emulated attention strided {dtype}", out, lse, q, k, v, mask, scale)
        print(f"attention {dtype}: ok", flush=True)


def _emu_main(lib: str, which: str) -> None:
    torch.manual_seed(0)
    emu = _Emulated(lib)
    if which in ("plan", "all"):
        _emu_plan_checks(emu)
        print("plan: ok", flush=True)
    if which == "sap":
        _emu_sap(emu, _EMU_SAP_QUICK)
    if which == "attn":
        _emu_attn(emu, _EMU_ATTN_QUICK)
    if which == "all":
        _emu_sap(emu, SAP_CASES[:-3] + _EMU_SAP_QUICK[-2:])
        _emu_attn(emu, _EMU_ATTN_QUICK + [(c, 0, 132, 227 * 1024) for c in ATTN_CASES
                                          if c[0] * c[1] * c[3] <= 20000])
    print("EMU OK", flush=True)


def _sanitize_main() -> int:
    """Every GPU forward shape once per dtype, checked; the workload of gpu_sanitize.sh."""
    torch.manual_seed(0)
    failures = 0
    for dtype in DTYPES:
        for case in SAP_CASES:
            B, H, W, C, Ch, (kh, kw), _, _ = case
            inputs = make_sap_inputs(case, dtype, "cuda")
            try:
                out = sap_cuda().sap_fwd(*inputs[:5], kh, kw, H, W, *inputs[5:])
                assert_close(f"sap {sap_id(case)} {dtype}", out.cpu(), *sap_expected(case, inputs),
                             dtype)
            except AssertionError as exc:
                failures += 1
                print(exc, flush=True)
        for case in ATTN_CASES:
            for num_splits in (0, 3):
                q, k, v, mask, scale = make_attn_inputs(case, dtype, "cuda")
                out, lse = attn_cuda().attn_fwd(q, k, v, mask, scale, num_splits=num_splits)
                try:
                    check_attn(f"attention {attn_id(case)} {dtype} splits={num_splits}",
                               out, lse, q, k, v, mask, scale)
                except AssertionError as exc:
                    failures += 1
                    print(exc, flush=True)
    torch.cuda.synchronize()
    print(f"sanitize run: {failures} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sanitize-run"]:
        sys.exit(_sanitize_main())
    if sys.argv[1:2] == ["--emu-run"] and len(sys.argv) == 4:
        _emu_main(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit("usage: test_cuda_kernels.py --sanitize-run | --emu-run LIB {plan,sap,attn,all}")
