// C interface between the query-to-patch attention CUDA kernels (attention_fwd.cu) and their
// torch binding (attention_cuda.cpp), plus the launch plan (pure host code, so it can be
// checked on any machine).
//
// The .cu files include only CUDA headers, so CI compiles them with nvcc alone (a CPU wheel of
// torch ships incomplete CUDA headers). The binding owns the torch side: argument checks, device
// guard, stream, allocation, and C10_CUDA_KERNEL_LAUNCH_CHECK after every launcher call (each
// launcher makes exactly one kernel launch).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace flashsloth_cuda {


constexpr int kAttnThreads = 128;     // threads of every attention block (4 warps)
constexpr int kAttnMaxBlockM = 16;    // query rows one block keeps in shared memory
constexpr int kAttnMaxBlockN = 128;   // keys per shared-memory tile: one per thread for scores
constexpr int kAttnMinBlockN = 16;
constexpr int kAttnMaxSplits = 128;   // the combine kernel gives one thread to each split
constexpr int kAttnMaxHeadDim = 256;
constexpr int kAttnMaxRowsPerThread = 8;
// Split the keys only while fewer than this many blocks per SM exist without a split; with a
// split, aim for about kAttnTargetBlocksPerSm blocks per SM (the Triton backend's heuristic).
constexpr int kAttnSplitBelowBlocksPerSm = 2;
constexpr int kAttnTargetBlocksPerSm = 4;

// How one forward call is cut into blocks: chosen by attn_fwd_make_plan from the problem and
// two device facts.
struct AttnFwdPlan {
  int block_m;          // query rows per block: min(Lq, 16)
  int block_n;          // keys per tile: 128, 64, 32 or 16
  int m_blocks;         // ceil(Lq / block_m): grid.y
  int num_splits;       // key ranges: grid.z; > 1 means partial results + the combine kernel
  int keys_per_split;
  int rows_per_thread;  // P V phase: query rows per thread (1, 2, 4 or 8), see the kernel
  size_t smem_bytes;    // dynamic shared memory of the forward kernel; 0 = does not fit
};

inline int attn_round4(int d) { return (d + 3) & ~3; }

// Bytes of dynamic shared memory: the query block (block_m x QS), K transposed (QS x
// (block_n + 1)), the scores / probabilities (block_m x (block_n + 4)), the V tile (block_n x
// VS) and three per-row arrays (running max, running sum, rescale factor), with QS and VS the
// head dims rounded up to 4 (rows of 16-byte vectors). The odd K^T row stride keeps the
// transposing stores free of bank conflicts.
inline size_t attn_fwd_smem_bytes(int block_m, int block_n, int Dk, int Dv) {
  const size_t qs = attn_round4(Dk), vs = attn_round4(Dv);
  const size_t bm = block_m, bn = block_n;
  return sizeof(float) * (bm * qs + qs * (bn + 1) + bm * (bn + 4) + bn * vs + 3 * bm);
}

inline int attn_ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// P V phase layout: the Dv outputs of a row are cut into ceil(Dv / 4) quads; thread t owns
// quad t % quads of rows t / quads + r * groups (groups = kAttnThreads / quads).
inline int attn_pv_quads(int Dv) { return (Dv + 3) / 4; }
inline int attn_pv_groups(int Dv) { return kAttnThreads / attn_pv_quads(Dv); }

// requested_splits: 0 = choose; n > 0 = cut the keys into ranges of ceil(Lk / n) keys (fewer
// than n ranges when that covers Lk sooner). sm_count and max_smem_bytes (the opt-in limit per
// block) describe the device.
inline AttnFwdPlan attn_fwd_make_plan(int64_t BH, int Lq, int Lk, int Dk, int Dv,
                                      int requested_splits, int sm_count, int max_smem_bytes) {
  AttnFwdPlan p{};
  p.block_m = Lq < kAttnMaxBlockM ? Lq : kAttnMaxBlockM;
  const int need = attn_ceil_div(p.block_m, attn_pv_groups(Dv));  // <= 8: groups >= 2
  p.rows_per_thread = 1;
  while (p.rows_per_thread < need) p.rows_per_thread *= 2;
  p.m_blocks = attn_ceil_div(Lq, p.block_m);
  p.block_n = kAttnMaxBlockN;
  while (p.block_n > kAttnMinBlockN &&
         attn_fwd_smem_bytes(p.block_m, p.block_n, Dk, Dv) > static_cast<size_t>(max_smem_bytes)) {
    p.block_n /= 2;
  }
  const int64_t blocks = BH * p.m_blocks;
  const int64_t target = static_cast<int64_t>(kAttnTargetBlocksPerSm) * sm_count;
  // Small grids (batch 1): shorter tiles give a key split more blocks to spread over.
  while (p.block_n > 64 && blocks * attn_ceil_div(Lk, p.block_n) < target) p.block_n /= 2;
  const size_t smem = attn_fwd_smem_bytes(p.block_m, p.block_n, Dk, Dv);
  p.smem_bytes = smem <= static_cast<size_t>(max_smem_bytes) ? smem : 0;

  const int n_tiles = attn_ceil_div(Lk, p.block_n);
  if (requested_splits > 0) {
    p.keys_per_split = attn_ceil_div(Lk, requested_splits);
  } else if (blocks >= static_cast<int64_t>(kAttnSplitBelowBlocksPerSm) * sm_count || n_tiles < 2) {
    p.keys_per_split = Lk;
  } else {
    int want = attn_ceil_div(target, blocks);
    want = want < n_tiles ? want : n_tiles;
    want = want < kAttnMaxSplits ? want : kAttnMaxSplits;
    // Whole tiles per split, so no tile is read by two blocks.
    p.keys_per_split = attn_ceil_div(attn_ceil_div(Lk, want), p.block_n) * p.block_n;
  }
  p.num_splits = attn_ceil_div(Lk, p.keys_per_split);
  return p;
}

// Arguments of the forward kernel. q, k, v contiguous (B, H, Lq, Dk), (B, H, Lk, Dk),
// (B, H, Lk, Dv) of one dtype; mask contiguous (B, Lk) bytes, nonzero = attend, or nullptr.
// Without a split the kernel writes out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) fp32
// (natural log, +inf on rows with no attended key); with a split it writes part_o
// (BH, num_splits, Lq, Dv) fp32, normalised by its own sum, and part_lse (BH, num_splits, Lq)
// fp32 in base 2 (-inf for a range with no attended key).
struct AttnFwdArgs {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;
  void* out;
  float* lse;
  float* part_o;
  float* part_lse;
  int64_t BH;
  int H, Lq, Lk, Dk, Dv;
  float qk_scale_log2;  // scale * log2(e): the softmax runs in base 2 (exp2)
};

// Merges the splits' partial results into out and lse (same layouts as above).
struct AttnCombineArgs {
  const float* part_o;
  const float* part_lse;
  void* out;
  float* lse;
  int64_t BH;
  int Lq, Dv, num_splits;
};

// Multiprocessor count and the opt-in shared-memory limit per block of `device`, cached.
cudaError_t attn_device_facts(int device, int* sm_count, int* max_smem_bytes);

// One launch each on `stream`; the caller checks it with C10_CUDA_KERNEL_LAUNCH_CHECK.
// Return cudaErrorInvalidValue for arguments or plans the kernels cannot take (the binding
// checks them first, so that is a bug), or the error of opting in to large shared memory.
cudaError_t attn_fwd_launch(Dtype dtype, const AttnFwdArgs& args, const AttnFwdPlan& plan,
                            cudaStream_t stream);
cudaError_t attn_fwd_combine_launch(Dtype dtype, const AttnCombineArgs& args,
                                    cudaStream_t stream);

}  // namespace flashsloth_cuda
