// Device utilities shared by every op's CUDA kernels (csrc/<op>/*_kernels.cuh): fp32 conversion
// of the element types, warp and block reductions, and the one dtype switch of the launchers.
//
// Device code and CUDA headers only (no torch), so nvcc compiles the .cu files alone and the
// host-side emulation of the CUDA execution model (tests/test_cuda_kernels.py) compiles them too.
#pragma once

#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/dtype.h"

namespace flashsloth_cuda {
namespace common {

constexpr int kWarpSize = 32;
// Largest block any kernel launches: block reductions' scratch holds kMaxWarps floats.
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// max that propagates NaN (fmaxf(NaN, x) returns x and would hide it; docs/contract.md: no
// kernel turns a NaN into a finite value). v != v is NaN's test; --use_fast_math keeps it.
__device__ __forceinline__ float nan_max(float a, float b) {
  return (a != a || b != b) ? a + b : fmaxf(a, b);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  return v;
}

// Block-wide reductions over all blockDim.x threads (a multiple of 32, at most kMaxThreads);
// `scratch` holds blockDim.x / 32 floats and serves one call only (a second call on the same
// scratch could overwrite it before every thread has read the result). The leading barrier
// also publishes the shared-memory writes made before the call.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? scratch[lane] : -INFINITY;
    v = warp_max(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? scratch[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// The one dtype switch of the launchers: calls fn(static_cast<T*>(nullptr)) with T the element
// type of `dtype` (float, __half, __nv_bfloat16); cudaErrorInvalidValue for any other value.
template <typename Fn>
cudaError_t dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32:
      return fn(static_cast<float*>(nullptr));
    case Dtype::kFloat16:
      return fn(static_cast<__half*>(nullptr));
    case Dtype::kBFloat16:
      return fn(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace common
}  // namespace flashsloth_cuda
