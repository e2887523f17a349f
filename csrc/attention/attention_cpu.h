// Parameters of the CPU query-to-patch attention kernels (csrc/attention/attention_cpu.cpp).
// Plain data only: this header is read by every instruction-set build of the kernels.
#pragma once

#include <cstdint>

namespace flashsloth {
namespace attention {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Work is cut into units of (b * H + h, query superblock, key split). Every unit owns
// disjoint output rows, so the units run in parallel with no atomics.
struct Shape {
  int64_t B, H, Lq, Lk, Dk, Dv;
  int64_t nsplit, split_len;  // key ranges [s * split_len, min(Lk, (s + 1) * split_len))
  int64_t nqsb, qsb_len;      // forward only: query superblocks of qsb_len rows
};

struct FwdParams {
  Shape s;
  const void* q;      // (B, H, Lq, Dk), contiguous, input dtype
  const void* k;      // (B, H, Lk, Dk)
  const void* v;      // (B, H, Lk, Dv)
  const bool* mask;   // (B, Lk), true = attend, or nullptr
  double scale;
  void* out;          // (B, H, Lq, Dv) input dtype        (written when nsplit == 1)
  void* lse;          // (B, H, Lq) accumulation dtype     (written when nsplit == 1)
  void* part_o;       // (nsplit, B, H, Lq, Dv) accumulation dtype (nsplit > 1)
  void* part_lse;     // (nsplit, B, H, Lq)                        (nsplit > 1)
  bool prefetch;      // software prefetch of the K / V rows ahead (prefetch_min_bytes)
};

struct BwdParams {
  Shape s;
  const void* dout;   // (B, H, Lq, Dv) input dtype
  const void* q;
  const void* k;
  const void* v;
  const bool* mask;
  double scale;
  const void* out;    // (B, H, Lq, Dv) input dtype
  const void* lse;    // (B, H, Lq) accumulation dtype
  void* dq;           // (B, H, Lq, Dk) input dtype (written when nsplit == 1)
  void* dk;           // (B, H, Lk, Dk)
  void* dv;           // (B, H, Lk, Dv)
  void* part_dq;      // (nsplit, B, H, Lq, Dk) accumulation dtype (nsplit > 1)
  bool prefetch;      // as FwdParams::prefetch
};

}  // namespace attention
}  // namespace flashsloth
