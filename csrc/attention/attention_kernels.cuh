// Device code of the query-to-patch attention forward (flash-decoding).
//
// The problem is few queries against many keys with small, odd head sizes (EmbQ: 9 queries,
// 729 patch keys, key dim 18, value dim 36): memory-bound, and too narrow for tensor-core
// tiles without padding, so the math runs on fp32 CUDA cores from shared memory.
//
// attn_fwd_kernel: grid (B*H, query blocks, key splits), kAttnThreads threads. A block keeps
// its query rows (pre-scaled by scale * log2 e) in shared memory and streams its key range
// in tiles of block_n keys: scores (one thread per (row, key)), an online softmax in base 2
// (one warp per row), then acc = acc * rescale + P V (each thread owns acc_slots (row, dim)
// outputs). Masked keys get probability 0; exponentials are always taken against a finite
// reference, so a row with no attended key ends with sum 0, out 0 and lse +inf, never NaN.
// attn_fwd_combine_kernel: one block per (batch*head, query row) merges the splits.
//
// Device code only (no launches): attention_fwd.cu launches it, and a host-side emulation
// of the CUDA execution model can compile this header as well.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_cuda.cuh"

namespace flashsloth_cuda {
namespace attn_detail {

constexpr int kWarps = kAttnThreads / 32;
constexpr float kLn2 = 0.6931471805599453f;

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

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 by a multiply-high (the head dims are runtime
// values; a hardware division per element would cost more than the load it indexes).
struct IntDivider {
  unsigned int d;
  unsigned int m1;
  unsigned int shift;

  __host__ __device__ static IntDivider make(unsigned int divisor) {
    IntDivider r;
    r.d = divisor;
    r.shift = 0;
    while ((1u << r.shift) < divisor) ++r.shift;
    const uint64_t one = 1;
    r.m1 = static_cast<unsigned int>(((one << 32) * ((one << r.shift) - divisor)) / divisor + 1);
    return r;
  }

  __device__ __forceinline__ unsigned int div(unsigned int n) const {
    const unsigned int t = __umulhi(n, m1);
    return (t + n) >> shift;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Block-wide reductions over kAttnThreads threads; `scratch` (kWarps floats) serves one call
// only. The leading barrier also publishes shared-memory writes made before the call.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : -INFINITY;
    v = warp_max(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// ACC: accumulator slots per thread, plan.acc_slots (block_m * Dv <= ACC * kAttnThreads).
template <typename T, int ACC>
__global__ void __launch_bounds__(kAttnThreads)
    attn_fwd_kernel(const AttnFwdArgs a, const AttnFwdPlan p, const IntDivider div_dk,
                    const IntDivider div_dv) {
  extern __shared__ float smem[];
  const int Dk = a.Dk, Dv = a.Dv;
  const int KS = Dk | 1;  // odd row stride: the keys of one warp fall in different banks
  const int BM = p.block_m, BN = p.block_n, SS = BN + 1;
  float* __restrict__ q_s = smem;          // BM x KS
  float* __restrict__ k_s = q_s + BM * KS;  // BN x KS
  float* __restrict__ v_s = k_s + BN * KS;  // BN x Dv
  float* __restrict__ p_s = v_s + BN * Dv;  // BM x SS: scores, then probabilities
  float* __restrict__ m_s = p_s + BM * SS;  // running max (base 2)
  float* __restrict__ l_s = m_s + BM;       // running sum
  float* __restrict__ r_s = l_s + BM;       // this tile's rescale factor of acc

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bh = blockIdx.x;
  const int m0 = blockIdx.y * BM;
  const int split = blockIdx.z;
  const int nq = min(BM, a.Lq - m0);
  const int n_begin = split * p.keys_per_split;
  const int n_end = min(a.Lk, n_begin + p.keys_per_split);
  const int64_t b = bh / a.H;

  const T* __restrict__ q = static_cast<const T*>(a.q) + (bh * a.Lq + m0) * Dk;
  const T* __restrict__ k = static_cast<const T*>(a.k) + bh * a.Lk * Dk;
  const T* __restrict__ v = static_cast<const T*>(a.v) + bh * a.Lk * Dv;
  const uint8_t* __restrict__ mask = a.mask != nullptr ? a.mask + b * a.Lk : nullptr;

  // The query rows are one contiguous run of nq * Dk elements.
  for (int e = tid; e < nq * Dk; e += kAttnThreads) {
    const int i = static_cast<int>(div_dk.div(e));
    q_s[i * KS + (e - i * Dk)] = to_float(q[e]) * a.qk_scale_log2;
  }
  for (int i = tid; i < BM; i += kAttnThreads) {
    m_s[i] = -INFINITY;
    l_s[i] = 0.f;
  }
  float acc[ACC];
#pragma unroll
  for (int s = 0; s < ACC; ++s) acc[s] = 0.f;
  __syncthreads();

  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    const int nb = min(BN, n_end - n0);
    // The tile's keys and values are contiguous runs too: coalesced loads, converted once.
    const T* __restrict__ kt = k + static_cast<int64_t>(n0) * Dk;
    for (int e = tid; e < nb * Dk; e += kAttnThreads) {
      const int j = static_cast<int>(div_dk.div(e));
      k_s[j * KS + (e - j * Dk)] = to_float(kt[e]);
    }
    const T* __restrict__ vt = v + static_cast<int64_t>(n0) * Dv;
    for (int e = tid; e < nb * Dv; e += kAttnThreads) v_s[e] = to_float(vt[e]);
    __syncthreads();

    // Scores in base 2; masked keys -inf. Threads run over keys first, so a warp shares its
    // query row (a broadcast) and reads consecutive K rows (odd stride: no bank conflicts).
    for (int e = tid; e < nq * BN; e += kAttnThreads) {
      const int i = e >> p.log2_block_n;
      const int j = e & (BN - 1);
      if (j >= nb) continue;
      float s = -INFINITY;
      if (mask == nullptr || mask[n0 + j] != 0) {
        const float* __restrict__ qr = q_s + i * KS;
        const float* __restrict__ kr = k_s + j * KS;
        s = 0.f;
        for (int d = 0; d < Dk; ++d) s = fmaf(qr[d], kr[d], s);
      }
      p_s[i * SS + j] = s;
    }
    __syncthreads();

    // Online softmax, one warp per query row.
    for (int i = warp; i < nq; i += kWarps) {
      float* __restrict__ pr = p_s + i * SS;
      float mx = -INFINITY;
      for (int j = lane; j < nb; j += 32) mx = fmaxf(mx, pr[j]);
      mx = warp_max(mx);
      const float m_old = m_s[i];
      const float m_new = fmaxf(m_old, mx);
      // While every key so far is masked m_new is -inf, and (-inf) - (-inf) would be NaN.
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
      for (int j = lane; j < nb; j += 32) {
        const float pj = exp2f(pr[j] - m_ref);
        pr[j] = pj;
        sum += pj;
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane has read m_s[i] before lane 0 replaces it
      if (lane == 0) {
        const float rescale = exp2f(m_old - m_ref);
        r_s[i] = rescale;
        l_s[i] = l_s[i] * rescale + sum;
        m_s[i] = m_new;
      }
    }
    __syncthreads();

    // acc = acc * rescale + P V over this tile; a warp's outputs are consecutive (row, dim)
    // pairs, so V reads are consecutive floats and P reads broadcasts.
#pragma unroll
    for (int s = 0; s < ACC; ++s) {
      const int e = tid + s * kAttnThreads;
      if (e < nq * Dv) {
        const int i = static_cast<int>(div_dv.div(e));
        const int d = e - i * Dv;
        const float* __restrict__ pr = p_s + i * SS;
        const float* __restrict__ vc = v_s + d;
        float o = acc[s] * r_s[i];
        for (int j = 0; j < nb; ++j) o = fmaf(pr[j], vc[j * Dv], o);
        acc[s] = o;
      }
    }
    __syncthreads();  // the next tile overwrites k_s, v_s and p_s
  }

  // l == 0 exactly when no key of the range was attended (the max key contributes 1 to the
  // sum); a NaN sum stays NaN rather than being hidden as "no keys".
  const bool split_out = a.part_o != nullptr;
#pragma unroll
  for (int s = 0; s < ACC; ++s) {
    const int e = tid + s * kAttnThreads;
    if (e < nq * Dv) {
      const int i = static_cast<int>(div_dv.div(e));
      const int d = e - i * Dv;
      const float l = l_s[i];
      const float o = l != 0.f ? acc[s] / l : 0.f;
      if (split_out) {
        a.part_o[((bh * p.num_splits + split) * a.Lq + m0 + i) * Dv + d] = o;
      } else {
        static_cast<T*>(a.out)[(bh * a.Lq + m0 + i) * Dv + d] = from_float<T>(o);
      }
    }
  }
  for (int i = tid; i < nq; i += kAttnThreads) {
    const float l = l_s[i];
    const float lse2 = m_s[i] + log2f(l);
    if (split_out) {
      a.part_lse[(bh * p.num_splits + split) * a.Lq + m0 + i] = l != 0.f ? lse2 : -INFINITY;
    } else {
      a.lse[bh * a.Lq + m0 + i] = l != 0.f ? lse2 * kLn2 : INFINITY;
    }
  }
}

// Grid: one block per (batch*head, query row), kAttnThreads threads, num_splits <= threads.
// out = sum_s w_s o_s with w_s = 2^(lse2_s - LSE2), LSE2 = log2 sum_s 2^lse2_s; ranges with no
// attended key carry lse2_s = -inf (weight 0); if all do, out = 0 and lse = +inf.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) attn_fwd_combine_kernel(const AttnCombineArgs a) {
  __shared__ float w_s[kAttnMaxSplits];
  __shared__ float red_max[kWarps];
  __shared__ float red_sum[kWarps];
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;  // bh * Lq + i
  const int64_t bh = row / a.Lq;
  const int i = static_cast<int>(row - bh * a.Lq);
  const int S = a.num_splits;

  const float lse_s = tid < S ? a.part_lse[(bh * S + tid) * a.Lq + i] : -INFINITY;
  const float big = block_max(lse_s, red_max);
  const float ref = big == -INFINITY ? 0.f : big;
  const float w = tid < S ? exp2f(lse_s - ref) : 0.f;
  if (tid < S) w_s[tid] = w;
  const float total = block_sum(w, red_sum);  // its barrier also publishes w_s
  const bool has_keys = total != 0.f;
  const float inv = has_keys ? 1.f / total : 0.f;

  T* __restrict__ out = static_cast<T*>(a.out);
  for (int d = tid; d < a.Dv; d += kAttnThreads) {
    float o = 0.f;
    for (int s = 0; s < S; ++s) {
      const float ws = w_s[s];
      if (ws != 0.f) o = fmaf(ws, a.part_o[((bh * S + s) * a.Lq + i) * a.Dv + d], o);
    }
    out[row * a.Dv + d] = from_float<T>(o * inv);
  }
  if (tid == 0) a.lse[row] = has_keys ? (ref + log2f(total)) * kLn2 : INFINITY;
}

}  // namespace attn_detail
}  // namespace flashsloth_cuda
