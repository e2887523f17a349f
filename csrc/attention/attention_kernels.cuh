// Device code of the query-to-patch attention forward (flash-decoding).
//
// The problem is few queries against many keys with small, odd head sizes (EmbQ: 9 queries,
// 729 patch keys, key dim 18, value dim 36): memory-bound, and too narrow for tensor-core
// tiles without padding, so the math runs on fp32 CUDA cores from shared memory.
//
// attn_fwd_kernel: grid (B*H, query blocks, key splits), kAttnThreads threads. A block keeps
// its query rows (pre-scaled by scale * log2 e) in shared memory and streams its key range in
// tiles of block_n keys (converted to fp32 once, K transposed):
//   scores    one thread per key, all the block's rows in registers; the query values are
//             16-byte broadcast loads, so shared-memory traffic is ~1 load per 3 FMAs;
//   softmax   online, in base 2, one warp per row;
//   P V       each thread owns a quad of 4 output dims of rows_per_thread rows: per 4 keys it
//             loads 4 V quads and one 4-key run of P per row (16-byte loads) for 16 FMAs per
//             row, so the FMA units, not shared memory, bound the loop.
// Masked keys get probability 0; exponentials are always taken against a finite reference,
// so a row with no attended key ends with sum 0, out 0 and lse +inf, never NaN.
// attn_fwd_combine_kernel: one block per (batch*head, query row) merges the splits.
//
// Device code only (no launches): attention_fwd.cu launches it, and a host-side emulation
// of the CUDA execution model can compile this header as well.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_cuda.cuh"
#include "common/cuda_utils.cuh"

namespace flashsloth_cuda {
namespace attn_detail {

using common::block_max;
using common::block_sum;
using common::from_float;
using common::to_float;
using common::warp_max;
using common::warp_sum;

constexpr int kWarps = kAttnThreads / 32;
constexpr float kLn2 = 0.6931471805599453f;

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

struct alignas(16) Quad {
  float x, y, z, w;
};

__device__ __forceinline__ Quad load_quad(const float* p) {
  return *reinterpret_cast<const Quad*>(p);
}

// RPT: rows per thread in the P V phase, plan.rows_per_thread.
template <typename T, int RPT>
__global__ void __launch_bounds__(kAttnThreads)
    attn_fwd_kernel(const AttnFwdArgs a, const AttnFwdPlan p, const IntDivider div_dk,
                    const IntDivider div_dv, const IntDivider div_qs) {
  extern __shared__ Quad smem_quads[];  // Quad: 16-byte alignment for the vector loads
  float* smem = reinterpret_cast<float*>(smem_quads);
  const int Dk = a.Dk, Dv = a.Dv;
  const int QS = (Dk + 3) & ~3, VS = (Dv + 3) & ~3;
  const int BM = p.block_m, BN = p.block_n;
  const int KTS = BN + 1;  // odd: the transposing stores of a warp hit different banks
  const int PS = BN + 4;   // rows of 16-byte runs
  float* __restrict__ q_s = smem;            // BM x QS, zero past Dk
  float* __restrict__ kt_s = q_s + BM * QS;  // QS x KTS: K transposed, zero rows past Dk
  float* __restrict__ p_s = kt_s + QS * KTS; // BM x PS: scores, then probabilities
  float* __restrict__ v_s = p_s + BM * PS;   // BN x VS
  float* __restrict__ m_s = v_s + BN * VS;   // running max (base 2)
  float* __restrict__ l_s = m_s + BM;        // running sum
  float* __restrict__ r_s = l_s + BM;        // this tile's rescale factor of acc

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

  for (int e = tid; e < nq * QS; e += kAttnThreads) {
    const int i = static_cast<int>(div_qs.div(e));
    const int d = e - i * QS;
    q_s[e] = d < Dk ? to_float(q[i * Dk + d]) : 0.f;  // scaled after the dot (the contract)
  }
  for (int e = tid; e < (QS - Dk) * KTS; e += kAttnThreads) kt_s[Dk * KTS + e] = 0.f;
  for (int i = tid; i < BM; i += kAttnThreads) {
    m_s[i] = -INFINITY;
    l_s[i] = 0.f;
  }
  // P V layout: quad dq of rows g, g + groups, ...; threads past quads * groups only load.
  const int quads = (Dv + 3) >> 2;
  const int groups = kAttnThreads / quads;
  const int g = tid / quads;
  const int dq = tid - g * quads;
  const bool pv_thread = g < groups;
  float acc[RPT][4];
#pragma unroll
  for (int r = 0; r < RPT; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;
  __syncthreads();

  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    const int nb = min(BN, n_end - n0);
    // The tile's keys and values are contiguous runs: coalesced loads, converted once. A
    // masked key's k and v rows are never read (stored as 0): whatever they hold (NaN, inf,
    // garbage) cannot reach the output through p = 0 times v.
    const T* __restrict__ kt = k + static_cast<int64_t>(n0) * Dk;
    for (int e = tid; e < nb * Dk; e += kAttnThreads) {
      const int j = static_cast<int>(div_dk.div(e));
      const bool attended = mask == nullptr || mask[n0 + j] != 0;
      kt_s[(e - j * Dk) * KTS + j] = attended ? to_float(kt[e]) : 0.f;
    }
    const T* __restrict__ vt = v + static_cast<int64_t>(n0) * Dv;
    for (int e = tid; e < nb * Dv; e += kAttnThreads) {
      const int j = static_cast<int>(div_dv.div(e));
      const bool attended = mask == nullptr || mask[n0 + j] != 0;
      v_s[j * VS + (e - j * Dv)] = attended ? to_float(vt[e]) : 0.f;
    }
    __syncthreads();

    // Scores in base 2, one thread per key: s = (q . k) * scale * log2(e), a non-finite one
    // turned into NaN so that it poisons its row (the contract); masked keys -inf.
    if (tid < nb) {
      const int j = tid;
      float s[kAttnMaxBlockM];
#pragma unroll
      for (int i = 0; i < kAttnMaxBlockM; ++i) s[i] = 0.f;
      for (int d0 = 0; d0 < QS; d0 += 4) {
        const float k0 = kt_s[(d0 + 0) * KTS + j];
        const float k1 = kt_s[(d0 + 1) * KTS + j];
        const float k2 = kt_s[(d0 + 2) * KTS + j];
        const float k3 = kt_s[(d0 + 3) * KTS + j];
#pragma unroll
        for (int i = 0; i < kAttnMaxBlockM; ++i) {
          if (i < nq) {
            const Quad qv = load_quad(q_s + i * QS + d0);  // the same address for every lane
            s[i] = fmaf(qv.w, k3, fmaf(qv.z, k2, fmaf(qv.y, k1, fmaf(qv.x, k0, s[i]))));
          }
        }
      }
      const bool keep = mask == nullptr || mask[n0 + j] != 0;
#pragma unroll
      for (int i = 0; i < kAttnMaxBlockM; ++i) {
        if (i < nq) {
          const float sv = s[i] * a.qk_scale_log2;
          p_s[i * PS + j] = keep ? (sv - sv == 0.f ? sv : NAN) : -INFINITY;  // +-inf - itself: NaN
        }
      }
    }
    __syncthreads();

    // Online softmax, one warp per query row.
    for (int i = warp; i < nq; i += kWarps) {
      float* __restrict__ pr = p_s + i * PS;
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

    // acc = acc * rescale + P V over this tile.
    if (pv_thread) {
      const float* __restrict__ vq = v_s + dq * 4;
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int i = g + r * groups;
        const float sc = i < nq ? r_s[i] : 0.f;
        acc[r][0] *= sc;
        acc[r][1] *= sc;
        acc[r][2] *= sc;
        acc[r][3] *= sc;
      }
      const int nb4 = nb & ~3;
      for (int j0 = 0; j0 < nb4; j0 += 4) {
        const Quad v0 = load_quad(vq + (j0 + 0) * VS);
        const Quad v1 = load_quad(vq + (j0 + 1) * VS);
        const Quad v2 = load_quad(vq + (j0 + 2) * VS);
        const Quad v3 = load_quad(vq + (j0 + 3) * VS);
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
          const int i = g + r * groups;
          if (i < nq) {
            const Quad pq = load_quad(p_s + i * PS + j0);
            acc[r][0] = fmaf(pq.w, v3.x, fmaf(pq.z, v2.x, fmaf(pq.y, v1.x, fmaf(pq.x, v0.x, acc[r][0]))));
            acc[r][1] = fmaf(pq.w, v3.y, fmaf(pq.z, v2.y, fmaf(pq.y, v1.y, fmaf(pq.x, v0.y, acc[r][1]))));
            acc[r][2] = fmaf(pq.w, v3.z, fmaf(pq.z, v2.z, fmaf(pq.y, v1.z, fmaf(pq.x, v0.z, acc[r][2]))));
            acc[r][3] = fmaf(pq.w, v3.w, fmaf(pq.z, v2.w, fmaf(pq.y, v1.w, fmaf(pq.x, v0.w, acc[r][3]))));
          }
        }
      }
      for (int j = nb4; j < nb; ++j) {
        const Quad vj = load_quad(vq + j * VS);
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
          const int i = g + r * groups;
          if (i < nq) {
            const float pj = p_s[i * PS + j];
            acc[r][0] = fmaf(pj, vj.x, acc[r][0]);
            acc[r][1] = fmaf(pj, vj.y, acc[r][1]);
            acc[r][2] = fmaf(pj, vj.z, acc[r][2]);
            acc[r][3] = fmaf(pj, vj.w, acc[r][3]);
          }
        }
      }
    }
    __syncthreads();  // the next tile overwrites kt_s, v_s and p_s
  }

  // l == 0 exactly when no key of the range was attended (the max key contributes 1 to the
  // sum); a NaN sum stays NaN rather than being hidden as "no keys". Lanes past Dv in the
  // last quad hold padding and are not stored.
  const bool split_out = a.part_o != nullptr;
  if (pv_thread) {
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int i = g + r * groups;
      if (i < nq) {
        const float l = l_s[i];
        const float inv = l != 0.f ? 1.f / l : 0.f;
        const int64_t row = split_out ? (bh * p.num_splits + split) * a.Lq + m0 + i
                                      : bh * a.Lq + m0 + i;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int d = dq * 4 + c;
          if (d < Dv) {
            const float o = acc[r][c] * inv;
            if (split_out) {
              a.part_o[row * Dv + d] = o;
            } else {
              static_cast<T*>(a.out)[row * Dv + d] = from_float<T>(o);
            }
          }
        }
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
