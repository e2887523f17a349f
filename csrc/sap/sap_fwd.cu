// Launchers of the SAP forward epilogue (kernels in sap_kernels.cuh). CUDA headers only: see
// sap_cuda.cuh for why, and sap_cuda.cpp for the torch side (GEMM, checks, stream, errors).
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sap_cuda.cuh"
#include "sap_kernels.cuh"

namespace flashsloth_cuda {
namespace {

constexpr int kDefaultSmemBytes = 48 * 1024;  // dynamic shared memory without an opt-in

int ceil_div(int a, int b) { return (a + b - 1) / b; }

bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

int element_size(Dtype dtype) { return dtype == Dtype::kFloat32 ? 4 : 2; }

template <typename T, int VEC>
cudaError_t launch(const SapEpilogueArgs& a, cudaStream_t stream) {
  const int Gw = ceil_div(a.W, a.kw);
  const int G = ceil_div(a.H, a.kh) * Gw;
  const int64_t blocks = a.B * G;
  if (a.B < 1 || blocks > INT32_MAX) return cudaErrorInvalidValue;
  // Enough threads to cover C in one pass of VEC-wide loads (C = 1152, bf16: 144 -> 160),
  // at least two warps so that the score phase has warps to spread the patches over.
  int threads = ceil_div(ceil_div(a.C, VEC), 32) * 32;
  threads = threads < 64 ? 64 : (threads > sap_detail::kMaxThreads ? sap_detail::kMaxThreads
                                                                     : threads);
  // scores of one window: at most the window clipped to the grid (a larger window is partial)
  const size_t smem = static_cast<size_t>(a.kh < a.H ? a.kh : a.H) *
                      static_cast<size_t>(a.kw < a.W ? a.kw : a.W) * sizeof(float);
  auto kernel = sap_detail::sap_fwd_epilogue_kernel<T, VEC>;
  if (smem > kDefaultSmemBytes) {
    // Windows of more than 12288 patches: opt in to the device's larger shared memory.
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned int>(blocks), threads, smem, stream>>>(a, Gw, G);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_any_width(const SapEpilogueArgs& a, int vec, cudaStream_t stream) {
  // 16 bytes at most: 8-wide vectors exist for 16-bit types only.
  if constexpr (sizeof(T) == 2) {
    if (vec == 8) return launch<T, 8>(a, stream);
  }
  switch (vec) {
    case 4:
      return launch<T, 4>(a, stream);
    case 2:
      return launch<T, 2>(a, stream);
    case 1:
      return launch<T, 1>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

int sap_fwd_vector_width(Dtype dtype, const SapEpilogueArgs& a) {
  const int elem = element_size(dtype);
  for (int vec = 16 / elem; vec > 1; vec /= 2) {
    const int bytes = vec * elem;
    if (a.C % vec == 0 && a.Ch % vec == 0 && aligned(a.z, vec * 4 < 16 ? vec * 4 : 16) && aligned(a.x, bytes) &&
        aligned(a.b1, bytes) && aligned(a.w2, bytes) && aligned(a.out, bytes)) {
      return vec;
    }
  }
  return 1;
}

cudaError_t sap_fwd_epilogue_launch(Dtype dtype, const SapEpilogueArgs& a,
                                    cudaStream_t stream) {
  if (a.H < 1 || a.W < 1 || a.C < 1 || a.Ch < 1 || a.kh < 1 || a.kw < 1 || a.z == nullptr ||
      a.x == nullptr || a.w2 == nullptr || a.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int vec = sap_fwd_vector_width(dtype, a);
  return common::dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return launch_any_width<T>(a, vec, stream);
  });
}

}  // namespace flashsloth_cuda
