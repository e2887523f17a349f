// C interface between the SAP CUDA kernels (sap_fwd.cu) and their torch binding (sap_cuda.cpp).
//
// The kernels and their launchers include only CUDA headers, so every .cu compiles with nvcc
// alone (CI compiles them against no torch at all: a CPU wheel of torch ships incomplete CUDA
// headers). The binding owns everything torch: argument checks, device guard, stream, the
// scorer GEMM through cuBLAS (at::mm), allocation, and C10_CUDA_KERNEL_LAUNCH_CHECK after
// every launcher call (each launcher makes exactly one kernel launch).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace flashsloth_cuda {


// Arguments of the fused epilogue: scores from the scorer GEMM's output, window softmax, and
// the attention-weighted sum of the window's patch features. All pointers are to contiguous
// tensors on one device; 16-bit tensors are read as __half / __nv_bfloat16; z is fp32 for
// every dtype (the numeric contract: fp32 intermediates).
struct SapEpilogueArgs {
  const float* z;               // (B*N, Ch) fp32: x @ w1^T, no bias (the GEMM output)
  const void* x;                // (B, N, C): patch features, N = H * W row-major
  const void* b1;               // (Ch,) or nullptr
  const void* w2;               // (Ch,)
  const void* b2;               // (1,) or nullptr (read on the device: no host sync)
  const uint8_t* dropout_mask;  // (B, N, Ch) bool as bytes, nonzero = keep; or nullptr
  float dropout_scale;          // 1 / (1 - p); ignored without a mask
  void* out;                    // (B, G, C), G = ceil(H / kh) * ceil(W / kw)
  int64_t B;
  int H, W, C, Ch, kh, kw;
};

// Launches the fused epilogue kernel on `stream` (one launch; the caller checks it with
// C10_CUDA_KERNEL_LAUNCH_CHECK). Returns cudaErrorInvalidValue for arguments the kernel cannot
// take (the binding checks them first, so that is a bug), else cudaSuccess.
cudaError_t sap_fwd_epilogue_launch(Dtype dtype, const SapEpilogueArgs& args,
                                    cudaStream_t stream);

// Elements a 16-byte-aligned vector load would read for this call (1, 2, 4 or 8): the largest
// width that divides C and Ch and keeps every row of x, w1-sized vectors and out aligned to
// VEC elements, and z (fp32) to VEC floats (read as VEC / 4 16-byte loads for VEC = 8).
int sap_fwd_vector_width(Dtype dtype, const SapEpilogueArgs& args);

}  // namespace flashsloth_cuda
