// Launchers of the query-to-patch attention forward (kernels in attention_kernels.cuh). CUDA
// headers only: see attention_cuda.cuh for why, and attention_cuda.cpp for the torch side.
#include <cstdint>
#include <type_traits>
#include <mutex>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_cuda.cuh"
#include "attention_kernels.cuh"

namespace flashsloth_cuda {
namespace {

constexpr size_t kDefaultSmemBytes = 48 * 1024;  // dynamic shared memory without an opt-in
constexpr int kMaxDevices = 64;

template <typename T, int RPT>
cudaError_t launch_fwd(const AttnFwdArgs& a, const AttnFwdPlan& p, cudaStream_t stream) {
  auto kernel = attn_detail::attn_fwd_kernel<T, RPT>;
  if (p.smem_bytes > kDefaultSmemBytes) {
    // Large head dims: opt in to more shared memory (idempotent, and cheap next to a launch).
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned int>(a.BH), static_cast<unsigned int>(p.m_blocks),
                  static_cast<unsigned int>(p.num_splits));
  using attn_detail::IntDivider;
  kernel<<<grid, kAttnThreads, p.smem_bytes, stream>>>(
      a, p, IntDivider::make(static_cast<unsigned int>(a.Dk)),
      IntDivider::make(static_cast<unsigned int>(a.Dv)),
      IntDivider::make(static_cast<unsigned int>(attn_round4(a.Dk))));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_fwd_any_rows(const AttnFwdArgs& a, const AttnFwdPlan& p, cudaStream_t stream) {
  switch (p.rows_per_thread) {
    case 1:
      return launch_fwd<T, 1>(a, p, stream);
    case 2:
      return launch_fwd<T, 2>(a, p, stream);
    case 4:
      return launch_fwd<T, 4>(a, p, stream);
    case 8:
      return launch_fwd<T, 8>(a, p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_combine(const AttnCombineArgs& a, cudaStream_t stream) {
  const int64_t rows = a.BH * a.Lq;
  attn_detail::attn_fwd_combine_kernel<T>
      <<<static_cast<unsigned int>(rows), kAttnThreads, 0, stream>>>(a);
  return cudaSuccess;
}

bool plan_fits(const AttnFwdArgs& a, const AttnFwdPlan& p) {
  return a.BH >= 1 && a.BH <= INT32_MAX && a.Lq >= 1 && a.Lk >= 1 && a.Dk >= 1 &&
         a.Dv >= 1 && a.Dk <= kAttnMaxHeadDim && a.Dv <= kAttnMaxHeadDim && p.smem_bytes > 0 &&
         p.block_m >= 1 && p.block_m <= kAttnMaxBlockM && p.block_n >= kAttnMinBlockN &&
         p.block_n <= kAttnMaxBlockN && (p.block_n & (p.block_n - 1)) == 0 &&
         p.m_blocks <= 65535 && p.num_splits >= 1 && p.num_splits <= kAttnMaxSplits &&
         p.rows_per_thread >= 1 && p.rows_per_thread <= kAttnMaxRowsPerThread &&
         p.rows_per_thread * attn_pv_groups(a.Dv) >= p.block_m &&
         (p.num_splits == 1 ? (a.out != nullptr && a.lse != nullptr)
                            : (a.part_o != nullptr && a.part_lse != nullptr));
}

}  // namespace

cudaError_t attn_device_facts(int device, int* sm_count, int* max_smem_bytes) {
  // Driver attribute queries are cheap but not free; the ~10 us budget of a batch-1 call is
  // spent on launches, so the two facts are read once per device.
  static std::mutex mu;
  static int cached_sm[kMaxDevices] = {0};
  static int cached_smem[kMaxDevices] = {0};
  if (device < 0) return cudaErrorInvalidDevice;
  if (device < kMaxDevices) {
    std::lock_guard<std::mutex> lock(mu);
    if (cached_sm[device] > 0) {
      *sm_count = cached_sm[device];
      *max_smem_bytes = cached_smem[device];
      return cudaSuccess;
    }
  }
  int sm = 0, smem = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices) {
    std::lock_guard<std::mutex> lock(mu);
    cached_sm[device] = sm;
    cached_smem[device] = smem;
  }
  *sm_count = sm;
  *max_smem_bytes = smem;
  return cudaSuccess;
}

cudaError_t attn_fwd_launch(Dtype dtype, const AttnFwdArgs& a, const AttnFwdPlan& p,
                            cudaStream_t stream) {
  if (!plan_fits(a, p)) return cudaErrorInvalidValue;
  return common::dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return launch_fwd_any_rows<T>(a, p, stream);
  });
}

cudaError_t attn_fwd_combine_launch(Dtype dtype, const AttnCombineArgs& a,
                                    cudaStream_t stream) {
  if (a.BH < 1 || a.Lq < 1 || a.Dv < 1 || a.num_splits < 1 || a.num_splits > kAttnMaxSplits ||
      a.BH * a.Lq > INT32_MAX || a.part_o == nullptr || a.part_lse == nullptr ||
      a.out == nullptr || a.lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  return common::dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return launch_combine<T>(a, stream);
  });
}

}  // namespace flashsloth_cuda
