// Parameters of the CPU SAP passes (csrc/sap/sap_cpu.cpp, bodies in sap_cpu_kernels.h).
// Plain data only: this header is read by every instruction-set build of the kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flashsloth {
namespace sap {

// x's dtype (forward) or the dtype of the backward's dW1 / dx GEMMs (backward). The
// accumulation type is float for the 16-bit types and float32, double for float64.
enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Geometry of the row-major, non-overlapping kh x kw windows (edge windows partial).
struct Windows {
  int64_t H, W, kh, kw, Gh, Gw, G;
  Windows(int64_t H_, int64_t W_, int64_t kh_, int64_t kw_)
      : H(H_), W(W_), kh(kh_), kw(kw_), Gh((H_ + kh_ - 1) / kh_), Gw((W_ + kw_ - 1) / kw_),
        G(Gh * Gw) {}
  // Patch indices (within one image) of window g, row-major; returns how many.
  int64_t patches(int64_t g, int64_t* idx) const {
    const int64_t r0 = (g / Gw) * kh, c0 = (g % Gw) * kw;
    const int64_t r1 = std::min(H, r0 + kh), c1 = std::min(W, c0 + kw);
    int64_t n = 0;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) idx[n++] = r * W + c;
    return n;
  }
};

// The scorer's per-call constants, in the accumulation type: b1 (zeros when None),
// w2s = w2 * scale (scale = the dropout scale with a mask, else 1), b2 (0 when None).
struct ScorerArgs {
  const void* b1;    // (Ch,)
  const void* w2s;   // (Ch,)
  double b2, scale;  // exact in the accumulation type (converted from it)
};

// Forward pass over windows [begin, end) of the flattened (B, G): scores from z, softmax,
// weighted sum of the window's x rows into out.
struct FwdArgs {
  ScorerArgs sc;
  Windows win;
  int64_t B, N, C, Ch;
  DType t;            // x's dtype
  const void* z;      // (B * N, Ch), accumulation type
  const void* x;      // (B * N, C), t
  const bool* mask;   // (B * N, Ch) dropout keep-mask, or nullptr
  void* out;          // (B * G, C), t
};

// Backward pass over strips [begin, end) of the flattened (B, Gh) (kh grid rows of one image):
// see bwd_strips in sap_cpu_kernels.h.
struct BwdArgs {
  ScorerArgs sc;
  Windows win;
  int64_t B, N, C, Ch;
  DType d;            // dtype of dz / dx (the dW1 / dx GEMMs' operands)
  void* z;            // (B * N, Ch) accumulation type; overwritten by dz when d is it
  void* dz;           // (B * N, Ch), d (== z when d is the accumulation type)
  const void* x;      // (B * N, C), accumulation type
  const void* gout;   // (B * G, C), accumulation type
  const bool* mask;   // (B * N, Ch) or nullptr
  void* ds;           // (B * N,) accumulation type
  void* dx;           // (B * N, C), d: the direct term alpha_i g (or nullptr: dx not needed)
  void* part;         // (B * Gh, 2 Ch) accumulation type: per-strip (dw2, db1), or nullptr
};

}  // namespace sap
}  // namespace flashsloth
