// Device code of the SAP forward: the epilogue that follows the scorer GEMM z = x @ w1^T.
//
// One thread block per (image, window). With N = H * W patches of C channels, Ch hidden units,
// and the window's patches i (at most kh * kw, fewer at the grid's edges):
//   1. s_i = dropout_scale * sum_c relu(z_ic + b1_c) * m_ic * w2_c + b2   (one warp per patch)
//   2. alpha = softmax(s) over the window, with the max subtracted      (block reductions)
//   3. out_c = sum_i alpha_i * x_ic                                        (threads over c)
// Everything is accumulated in fp32; loads are 16-byte vectors when the sizes allow (VEC).
// This header holds device code only (no launches), so a host-side emulation of the CUDA
// execution model can compile it as well; sap_fwd.cu launches it.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_utils.cuh"
#include "sap_cuda.cuh"

namespace flashsloth_cuda {
namespace sap_detail {

using common::block_max;
using common::block_sum;
using common::from_float;
using common::to_float;
using common::warp_max;
using common::warp_sum;

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;

// VEC consecutive elements read or written as one aligned access (16 bytes at most).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Reads VEC elements as 16-byte loads at most (8 floats: two loads; the fp32 z next to 16-bit x).
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, float (&out)[VEC]) {
  constexpr int kW = VEC * sizeof(T) > 16 ? static_cast<int>(16 / sizeof(T)) : VEC;
#pragma unroll
  for (int j = 0; j < VEC; j += kW) {
    const Pack<T, kW> pk = *reinterpret_cast<const Pack<T, kW>*>(p + j);
#pragma unroll
    for (int k = 0; k < kW; ++k) out[j + k] = to_float(pk.v[k]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// relu that keeps a NaN (fmaxf(NaN, 0) would return 0 and hide it, unlike torch.relu).
__device__ __forceinline__ float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

// Grid: one block per (image b, window g), blockIdx.x = b * G + g; blockDim.x a multiple of 32,
// at most kMaxThreads. Dynamic shared memory: kh * kw floats (the window's scores).
// Requires C % VEC == 0, Ch % VEC == 0 and every pointer aligned to VEC elements.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    sap_fwd_epilogue_kernel(const SapEpilogueArgs a, const int Gw, const int G) {
  extern __shared__ float alpha_s[];
  __shared__ float red_max[kMaxWarps];
  __shared__ float red_sum[kMaxWarps];

  const float* __restrict__ z = a.z;  // fp32 for every T (the contract's fp32 intermediate)
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ b1 = static_cast<const T*>(a.b1);
  const T* __restrict__ w2 = static_cast<const T*>(a.w2);
  T* __restrict__ out = static_cast<T*>(a.out);

  const int64_t bg = blockIdx.x;
  const int64_t b = bg / G;
  const int g = static_cast<int>(bg - b * G);
  const int gi = g / Gw;
  const int gj = g - gi * Gw;
  const int r0 = gi * a.kh;
  const int c0 = gj * a.kw;
  const int wh = min(a.kh, a.H - r0);  // edge windows hold only the patches that exist
  const int ww = min(a.kw, a.W - c0);
  const int n_win = wh * ww;
  const int64_t N = static_cast<int64_t>(a.H) * a.W;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const bool has_mask = a.dropout_mask != nullptr;
  const float b2 = a.b2 != nullptr ? to_float(static_cast<const T*>(a.b2)[0]) : 0.f;

  // 1. Scores, one warp per patch: Ch is large (1152 in FlashSloth) and a window small (9).
  for (int i = warp; i < n_win; i += nwarps) {
    const int64_t n = static_cast<int64_t>(r0 + i / ww) * a.W + (c0 + i % ww);
    const int64_t row = b * N + n;
    const float* __restrict__ zr = z + row * a.Ch;
    const uint8_t* __restrict__ mr = has_mask ? a.dropout_mask + row * a.Ch : nullptr;
    float acc = 0.f;
    for (int c = lane * VEC; c < a.Ch; c += 32 * VEC) {
      float zv[VEC], wv[VEC], bv[VEC];
      load_pack<float, VEC>(zr + c, zv);
      load_pack<T, VEC>(w2 + c, wv);
      if (b1 != nullptr) {
        load_pack<T, VEC>(b1 + c, bv);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) bv[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float h = relu_keep_nan(zv[k] + bv[k]);
        if (has_mask) h *= static_cast<float>(mr[c + k]);  // a multiply: NaN survives a drop
        acc = fmaf(h, wv[k], acc);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) alpha_s[i] = (has_mask ? acc * a.dropout_scale : acc) + b2;
  }

  __syncthreads();  // the scores were written by lane 0 of each warp

  // 2. Window softmax with the max subtracted.
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n_win; i += blockDim.x) m = fmaxf(m, alpha_s[i]);
  m = block_max(m, red_max);
  float sum = 0.f;
  for (int i = threadIdx.x; i < n_win; i += blockDim.x) {
    const float e = __expf(alpha_s[i] - m);
    alpha_s[i] = e;
    sum += e;
  }
  sum = block_sum(sum, red_sum);  // its barrier also publishes the exponentials
  const float inv_sum = 1.f / sum;

  // 3. Weighted sum of the window's rows of x, threads across channels (coalesced rows).
  const T* __restrict__ xb = x + b * N * a.C;
  T* __restrict__ ob = out + bg * a.C;
  for (int c = threadIdx.x * VEC; c < a.C; c += blockDim.x * VEC) {
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
    int i = 0;
    for (int r = 0; r < wh; ++r) {
      const T* __restrict__ xr = xb + (static_cast<int64_t>(r0 + r) * a.W + c0) * a.C + c;
      for (int cc = 0; cc < ww; ++cc, ++i) {
        float xv[VEC];
        load_pack<T, VEC>(xr + static_cast<int64_t>(cc) * a.C, xv);
        const float w = alpha_s[i];
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = fmaf(w, xv[k], acc[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] *= inv_sum;
    store_pack<T, VEC>(ob + c, acc);
  }
}

}  // namespace sap_detail
}  // namespace flashsloth_cuda
