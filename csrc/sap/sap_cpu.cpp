// Fused CPU kernels of spatial attention pooling (SAP): torch.ops.flashsloth_C.sap_fwd_cpu and
// sap_bwd_cpu. The math is flashsloth_kernels/sap/reference.py's; shapes:
//   x: (B, N = H * W, C), w1: (Ch, C), b1: (Ch,) or None, w2: (Ch,), b2: (1,) or None,
//   dropout_mask: (B, N, Ch) bool or None, grad_out / out: (B, G, C).
//
// The op is one (B*N x C) x (C x Ch) GEMM plus a few passes over x, so the design keeps the
// GEMM in MKL/oneDNN (at::mm) and fuses everything else into as few passes as possible:
//   forward:  z = x W1^T (at::mm, b1 left out of the GEMM and added in the epilogue), then one
//             parallel pass over windows that scores the window's rows from z, takes the
//             max-subtracted softmax and writes the weighted sum of the x rows.
//   backward: recompute z (never saved by the forward), pass 1 over windows (scores, softmax,
//             ds, dx_direct = alpha * g), pass 2 over fixed row blocks writing
//             dz = ds * w2 * mask * scale * [z > 0] in place over z and accumulating per-block
//             partials of dw2 and db1, then dW1 = dz^T x and dx = dx_direct + dz W1 (at::mm,
//             at::addmm_).
// Elementwise work accumulates in float (double for float64 inputs). Every reduction of ours runs
// in a fixed order that does not depend on the thread count: a window is handled by one thread,
// and cross-row sums go through per-block partials (blocks of a fixed row count) reduced in block
// order.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace flashsloth {
namespace sap {
namespace {

using at::Tensor;

// Width of the independent partial sums of the dot products: lets the compiler vectorise the
// inner loops without -ffast-math while keeping the summation order fixed.
constexpr int kLanes = 16;
// Rows per block of the backward's cross-row reductions (dw2, db1). Fixed, so the result does not
// depend on how many threads share the blocks.
constexpr int64_t kRowBlock = 64;

template <typename acc_t>
inline acc_t reduce_lanes(const acc_t* acc) {
  acc_t t[kLanes];
  for (int j = 0; j < kLanes; ++j) t[j] = acc[j];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

// s = w2s . relu(z + b1) (* mask) + b2 for one row of z. w2s already holds w2 * dropout_scale
// when there is a mask, so the mask enters as a 0/1 factor.
template <typename T, typename acc_t>
inline acc_t row_score(const T* z, const acc_t* b1, const acc_t* w2s, const bool* m, int64_t Ch,
                       acc_t b2) {
  acc_t acc[kLanes] = {};
  int64_t k = 0;
  if (m == nullptr) {
    for (; k + kLanes <= Ch; k += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        acc_t v = static_cast<acc_t>(z[k + j]) + b1[k + j];
        acc[j] += w2s[k + j] * (v > acc_t(0) ? v : acc_t(0));
      }
    for (int j = 0; k + j < Ch; ++j) {
      acc_t v = static_cast<acc_t>(z[k + j]) + b1[k + j];
      acc[j] += w2s[k + j] * (v > acc_t(0) ? v : acc_t(0));
    }
  } else {
    for (; k + kLanes <= Ch; k += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        acc_t v = static_cast<acc_t>(z[k + j]) + b1[k + j];
        acc[j] += w2s[k + j] * (v > acc_t(0) && m[k + j] ? v : acc_t(0));
      }
    for (int j = 0; k + j < Ch; ++j) {
      acc_t v = static_cast<acc_t>(z[k + j]) + b1[k + j];
      acc[j] += w2s[k + j] * (v > acc_t(0) && m[k + j] ? v : acc_t(0));
    }
  }
  return reduce_lanes(acc) + b2;
}

template <typename T, typename acc_t>
inline acc_t dot_row(const T* x, const acc_t* g, int64_t C) {
  acc_t acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += g[c + j] * static_cast<acc_t>(x[c + j]);
  for (int j = 0; c + j < C; ++j) acc[j] += g[c + j] * static_cast<acc_t>(x[c + j]);
  return reduce_lanes(acc);
}

// Geometry of the row-major, non-overlapping kh x kw windows (edge windows partial).
struct Windows {
  int64_t H, W, kh, kw, Gw, G;
  Windows(int64_t H_, int64_t W_, int64_t kh_, int64_t kw_)
      : H(H_), W(W_), kh(kh_), kw(kw_), Gw((W_ + kw_ - 1) / kw_),
        G(((H_ + kh_ - 1) / kh_) * ((W_ + kw_ - 1) / kw_)) {}
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

// In place: s[0..n) -> softmax(s), max-subtracted so large scores stay finite.
template <typename acc_t>
inline void softmax_inplace(acc_t* s, int64_t n) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
}

// Per-call constants of the scorer, in acc_t: b1 (zeros when None), w2 * scale, b2.
template <typename acc_t>
struct Scorer {
  std::vector<acc_t> b1, w2s, w2;
  acc_t b2 = 0, scale = 1;
  bool masked = false;
  Scorer(const std::optional<Tensor>& b1_, const Tensor& w2_, const std::optional<Tensor>& b2_,
         bool masked_, double scale_, int64_t Ch)
      : b1(Ch, acc_t(0)), w2s(Ch), w2(Ch), masked(masked_) {
    const at::ScalarType st = c10::CppTypeToScalarType<acc_t>::value;
    scale = masked ? static_cast<acc_t>(scale_) : acc_t(1);
    if (b1_.has_value()) {
      Tensor t = b1_->to(st).contiguous();
      std::copy(t.data_ptr<acc_t>(), t.data_ptr<acc_t>() + Ch, b1.begin());
    }
    Tensor t2 = w2_.to(st).contiguous();
    std::copy(t2.data_ptr<acc_t>(), t2.data_ptr<acc_t>() + Ch, w2.begin());
    for (int64_t k = 0; k < Ch; ++k) w2s[k] = w2[k] * scale;
    if (b2_.has_value()) b2 = b2_->to(st).item<acc_t>();
  }
};

void check_inputs(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                  const Tensor& w2, const std::optional<Tensor>& b2, int64_t kh, int64_t kw,
                  int64_t H, int64_t W, const std::optional<Tensor>& mask) {
  TORCH_CHECK(x.device().is_cpu(), "sap (cpu): x must be a CPU tensor, got device ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "sap (cpu): x must be float64, float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() == 3, "sap (cpu): x must be (B, N, C), got shape ", x.sizes());
  TORCH_CHECK(kh >= 1 && kw >= 1, "sap (cpu): window (kh, kw) must be >= 1, got (", kh, ", ", kw,
              ")");
  TORCH_CHECK(H >= 1 && W >= 1, "sap (cpu): grid (H, W) must be >= 1, got (", H, ", ", W, ")");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(N == H * W, "sap (cpu): x has N = ", N, " patches (shape ", x.sizes(),
              ") but the grid is H * W = ", H, " * ", W, " = ", H * W);
  TORCH_CHECK(C >= 1, "sap (cpu): x needs C >= 1 channels, got shape ", x.sizes());
  auto same = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "sap (cpu): ", name, " must be a CPU tensor, got device ",
                t.device());
    TORCH_CHECK(t.scalar_type() == dt, "sap (cpu): ", name, " must have x's dtype ", dt, ", got ",
                t.scalar_type());
  };
  same(w1, "w1");
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C && w1.size(0) >= 1,
              "sap (cpu): w1 must be (Ch, C) = (*, ", C, "), got shape ", w1.sizes());
  const int64_t Ch = w1.size(0);
  if (b1.has_value()) {
    same(*b1, "b1");
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == Ch, "sap (cpu): b1 must be (Ch,) = (", Ch,
                ",), got shape ", b1->sizes());
  }
  same(w2, "w2");
  TORCH_CHECK(w2.dim() == 1 && w2.size(0) == Ch, "sap (cpu): w2 must be (Ch,) = (", Ch,
              ",), got shape ", w2.sizes());
  if (b2.has_value()) {
    same(*b2, "b2");
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == 1, "sap (cpu): b2 must be (1,), got shape ",
                b2->sizes());
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu(), "sap (cpu): dropout_mask must be a CPU tensor, got ",
                mask->device());
    TORCH_CHECK(mask->scalar_type() == at::kBool, "sap (cpu): dropout_mask must be bool, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) == B && mask->size(1) == N &&
                    mask->size(2) == Ch,
                "sap (cpu): dropout_mask must be (B, N, Ch) = (", B, ", ", N, ", ", Ch,
                "), got shape ", mask->sizes());
  }
}

// dtype the GEMMs run in: the input dtype for float32 / float64, and for float16 / bfloat16
// when the caller says oneDNN has a fast 16-bit GEMM on this CPU (lowp_gemm); float32 otherwise
// (the fallback 16-bit GEMM is 5-70x slower than MKL's sgemm on CPUs without it).
at::ScalarType gemm_dtype(at::ScalarType dt, bool lowp_gemm) {
  if (dt == at::kFloat || dt == at::kDouble) return dt;
  return lowp_gemm ? dt : at::kFloat;
}

template <typename T, typename acc_t>
void fwd_windows(const T* z, const T* x, const bool* mask, const Scorer<acc_t>& sc,
                 const Windows& win, int64_t B, int64_t N, int64_t C, int64_t Ch, T* out) {
  const int64_t wmax = win.kh * win.kw;
  at::parallel_for(0, B * win.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(wmax);
    std::vector<acc_t> s(wmax), acc(C);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / win.G, g = bg % win.G;
      const int64_t n = win.patches(g, idx.data());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = b * N + idx[i];
        s[i] = row_score(z + r * Ch, sc.b1.data(), sc.w2s.data(),
                         mask ? mask + r * Ch : nullptr, Ch, sc.b2);
      }
      softmax_inplace(s.data(), n);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < n; ++i) {
        const T* xr = x + (b * N + idx[i]) * C;
        const acc_t a = s[i];
        for (int64_t c = 0; c < C; ++c) acc[c] += a * static_cast<acc_t>(xr[c]);
      }
      T* o = out + bg * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(acc[c]);
    }
  });
}

template <typename T>
Tensor fwd_impl(const Tensor& xg, const Tensor& w1g, const std::optional<Tensor>& b1,
                const Tensor& w2, const std::optional<Tensor>& b2, const Windows& win,
                const std::optional<Tensor>& mask, double scale) {
  using acc_t = at::opmath_type<T>;
  const int64_t B = xg.size(0), N = xg.size(1), C = xg.size(2), Ch = w1g.size(0);
  // b1 stays out of the GEMM: the epilogue adds it, which spares a broadcast copy into z.
  Tensor z = at::mm(xg.view({B * N, C}), w1g.t());
  Tensor out = at::empty({B, win.G, C}, xg.options());
  Scorer<acc_t> sc(b1, w2, b2, mask.has_value(), scale, Ch);
  fwd_windows<T, acc_t>(z.const_data_ptr<T>(), xg.const_data_ptr<T>(),
                        mask ? mask->const_data_ptr<bool>() : nullptr, sc, win, B, N, C, Ch,
                        out.mutable_data_ptr<T>());
  return out;
}

Tensor sap_fwd_cpu(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                   const Tensor& w2, const std::optional<Tensor>& b2, int64_t kh, int64_t kw,
                   int64_t H, int64_t W, const std::optional<Tensor>& dropout_mask,
                   double dropout_scale, bool lowp_gemm) {
  check_inputs(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask);
  const Windows win(H, W, kh, kw);
  const auto gd = gemm_dtype(x.scalar_type(), lowp_gemm);
  Tensor xg = x.to(gd).contiguous();
  Tensor w1g = w1.to(gd).contiguous();
  std::optional<Tensor> mask;
  if (dropout_mask.has_value()) mask = dropout_mask->contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd, "sap_fwd_cpu", [&] {
    out = fwd_impl<scalar_t>(xg, w1g, b1, w2, b2, win, mask, dropout_scale);
  });
  return out.to(x.scalar_type());
}

// Backward pass 1, one window per iteration: scores from z, softmax alpha,
// dalpha_i = g . x_i, ds_i = alpha_i (dalpha_i - sum_j alpha_j dalpha_j), and (need_x)
// dx_i = alpha_i g, the direct term the dx GEMM later accumulates onto.
template <typename acc_t, typename D>
void bwd_windows(const acc_t* z, const acc_t* x, const acc_t* gout, const bool* mask,
                 const Scorer<acc_t>& sc, const Windows& win, int64_t B, int64_t N, int64_t C,
                 int64_t Ch, acc_t* ds, D* dx) {
  const int64_t wmax = win.kh * win.kw;
  at::parallel_for(0, B * win.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(wmax);
    std::vector<acc_t> alpha(wmax), dalpha(wmax);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / win.G, g = bg % win.G;
      const int64_t n = win.patches(g, idx.data());
      const acc_t* gw = gout + bg * C;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = b * N + idx[i];
        alpha[i] = row_score(z + r * Ch, sc.b1.data(), sc.w2s.data(),
                             mask ? mask + r * Ch : nullptr, Ch, sc.b2);
        dalpha[i] = dot_row(x + r * C, gw, C);
      }
      softmax_inplace(alpha.data(), n);
      acc_t inner = 0;
      for (int64_t i = 0; i < n; ++i) inner += alpha[i] * dalpha[i];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = b * N + idx[i];
        ds[r] = alpha[i] * (dalpha[i] - inner);
        if (dx != nullptr) {
          D* d = dx + r * C;
          const acc_t a = alpha[i];
          for (int64_t c = 0; c < C; ++c) d[c] = static_cast<D>(a * gw[c]);
        }
      }
    }
  });
}

// Backward pass 2 over rows [r0, r1): dz = ds * w2 * mask * scale * [z > 0] into dz (which may
// alias z: each element is read before it is written); when part != nullptr also accumulates
// part[0..Ch) += ds * a (dw2) and part[Ch..2Ch) += dz (db1, from dz before any rounding).
template <typename acc_t, typename D>
inline void bwd_rows(const acc_t* z, D* dz, const acc_t* ds, const bool* mask,
                     const Scorer<acc_t>& sc, int64_t r0, int64_t r1, int64_t Ch, acc_t* part) {
  const acc_t* b1 = sc.b1.data();
  const acc_t* w2s = sc.w2s.data();
  const acc_t scale = sc.scale;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* zr = z + r * Ch;
    D* dzr = dz + r * Ch;
    const bool* m = mask ? mask + r * Ch : nullptr;
    const acc_t d = ds[r];
    if (part == nullptr) {
      for (int64_t k = 0; k < Ch; ++k) {
        const acc_t v = zr[k] + b1[k];
        const bool on = v > acc_t(0) && (m == nullptr || m[k]);
        dzr[k] = static_cast<D>(on ? d * w2s[k] : acc_t(0));
      }
    } else {
      acc_t* dw2 = part;
      acc_t* db1 = part + Ch;
      for (int64_t k = 0; k < Ch; ++k) {
        const acc_t v = zr[k] + b1[k];
        const bool on = v > acc_t(0) && (m == nullptr || m[k]);
        const acc_t g = on ? d * w2s[k] : acc_t(0);
        dw2[k] += on ? d * (v * scale) : acc_t(0);
        db1[k] += g;
        dzr[k] = static_cast<D>(g);
      }
    }
  }
}

// D: dtype of the dW1 / dx GEMMs (x's dtype, or float32 for 16-bit x without a fast 16-bit
// GEMM). The recomputed z is always float32 / float64, even when D is 16-bit: the window
// softmax backward (ds sums to 0 over each window) and db1 (a sum of ds) cancel heavily, and
// scores from a 16-bit-rounded z gave 1-5e-2 relative errors in dW1 / db1 at C = 1152 against
// 2e-3 from a float32 z. dz is rounded to D only as an operand of the two later GEMMs.
template <typename D>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_impl(
    const Tensor& gout, const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
    const Tensor& w2, const std::optional<Tensor>& b2, const Windows& win,
    const std::optional<Tensor>& mask, double scale, bool need_x, bool need_w) {
  using acc_t = at::opmath_type<D>;
  constexpr bool kInPlace = std::is_same_v<acc_t, D>;
  const at::ScalarType acc_st = c10::CppTypeToScalarType<acc_t>::value;
  const at::ScalarType d_st = c10::CppTypeToScalarType<D>::value;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Ch = w1.size(0);
  const int64_t M = B * N;
  const auto acc_opts = x.options().dtype(acc_st);
  const Tensor xa = x.to(acc_st).contiguous().view({M, C});
  const Tensor w1a = w1.to(acc_st).contiguous();
  Tensor z = at::mm(xa, w1a.t());  // recomputed: the forward saves no (B, N, Ch) activation
  Scorer<acc_t> sc(b1, w2, b2, mask.has_value(), scale, Ch);
  const bool* mp = mask ? mask->const_data_ptr<bool>() : nullptr;
  const Tensor g = gout.to(acc_st).contiguous();
  Tensor ds = at::empty({M}, acc_opts);
  Tensor dx = need_x ? at::empty({M, C}, x.options().dtype(d_st)) : Tensor();
  bwd_windows<acc_t, D>(z.const_data_ptr<acc_t>(), xa.const_data_ptr<acc_t>(),
                        g.const_data_ptr<acc_t>(), mp, sc, win, B, N, C, Ch,
                        ds.mutable_data_ptr<acc_t>(), need_x ? dx.mutable_data_ptr<D>() : nullptr);

  const int64_t nblk = (M + kRowBlock - 1) / kRowBlock;
  Tensor part = need_w ? at::zeros({nblk, 2 * Ch}, acc_opts) : Tensor();
  Tensor dz = kInPlace ? z : at::empty({M, Ch}, x.options().dtype(d_st));
  {
    const acc_t* zp = z.const_data_ptr<acc_t>();
    D* dzp = dz.mutable_data_ptr<D>();  // z itself when D is acc_t
    const acc_t* dsp = ds.const_data_ptr<acc_t>();
    acc_t* pp = need_w ? part.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk)
        bwd_rows<acc_t, D>(zp, dzp, dsp, mp, sc, blk * kRowBlock,
                           std::min(M, (blk + 1) * kRowBlock), Ch,
                           pp ? pp + blk * 2 * Ch : nullptr);
    });
  }
  const Tensor xd = kInPlace ? xa : x.contiguous().view({M, C});
  const Tensor w1d = kInPlace ? w1a : w1.contiguous();

  Tensor dw1, db1, dw2, db2;
  if (need_w) {
    dw1 = at::mm(dz.t(), xd);
    // Block partials summed in block order, whatever the thread count. dw2 and db1 get their
    // own buffers: the op's outputs must not alias one another.
    dw2 = at::empty({Ch}, acc_opts);
    db1 = at::empty({Ch}, acc_opts);
    {
      const acc_t* pp = part.const_data_ptr<acc_t>();
      acc_t* outs[2] = {dw2.mutable_data_ptr<acc_t>(), db1.mutable_data_ptr<acc_t>()};
      at::parallel_for(0, 2 * Ch, 256, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          acc_t t = 0;
          for (int64_t blk = 0; blk < nblk; ++blk) t += pp[blk * 2 * Ch + k];
          outs[k / Ch][k % Ch] = t;
        }
      });
    }
    const acc_t* dsp = ds.const_data_ptr<acc_t>();
    acc_t tot = 0;
    for (int64_t r = 0; r < M; ++r) tot += dsp[r];
    db2 = at::full({1}, tot, acc_opts);
  }
  if (need_x) dx.addmm_(dz, w1d);
  return {need_x ? dx.view({B, N, C}) : Tensor(), dw1, db1, dw2, db2};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sap_bwd_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
    const Tensor& w2, const std::optional<Tensor>& b2, int64_t kh, int64_t kw, int64_t H,
    int64_t W, const std::optional<Tensor>& dropout_mask, double dropout_scale, bool need_x,
    bool need_w, bool lowp_gemm) {
  check_inputs(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask);
  const Windows win(H, W, kh, kw);
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(grad_out.device().is_cpu(), "sap (cpu): grad_out must be a CPU tensor, got ",
              grad_out.device());
  TORCH_CHECK(grad_out.is_floating_point(), "sap (cpu): grad_out must be floating point, got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == win.G &&
                  grad_out.size(2) == C,
              "sap (cpu): grad_out must be (B, G, C) = (", B, ", ", win.G, ", ", C,
              "), got shape ", grad_out.sizes());
  // a fresh empty tensor per unused output: outputs of an op must not alias one another
  auto empty = [&] { return at::empty({0}, x.options()); };
  if (!need_x && !need_w) return {empty(), empty(), empty(), empty(), empty()};
  std::optional<Tensor> mask;
  if (dropout_mask.has_value()) mask = dropout_mask->contiguous();
  const auto gd = gemm_dtype(x.scalar_type(), lowp_gemm);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd, "sap_bwd_cpu", [&] {
    r = bwd_impl<scalar_t>(grad_out, x.to(gd), w1.to(gd), b1, w2, b2, win, mask,
                           dropout_scale, need_x, need_w);
  });
  auto [dx, dw1, db1, dw2, db2] = r;
  const auto wt = w1.scalar_type();
  return {need_x ? dx.to(x.scalar_type()) : empty(),
          need_w ? dw1.to(wt) : empty(),
          need_w ? db1.to(wt) : empty(),
          need_w ? dw2.to(w2.scalar_type()) : empty(),
          need_w ? db2.to(w2.scalar_type()) : empty()};
}

}  // namespace
}  // namespace sap
}  // namespace flashsloth

TORCH_LIBRARY_FRAGMENT(flashsloth_C, m) {
  m.def(
      "sap_fwd_cpu(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int kh, int kw, "
      "int H, int W, Tensor? dropout_mask, float dropout_scale, bool lowp_gemm) -> Tensor");
  m.def(
      "sap_bwd_cpu(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
      "int kh, int kw, int H, int W, Tensor? dropout_mask, float dropout_scale, bool need_x, "
      "bool need_w, bool lowp_gemm) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashsloth_C, CPU, m) {
  m.impl("sap_fwd_cpu", &flashsloth::sap::sap_fwd_cpu);
  m.impl("sap_bwd_cpu", &flashsloth::sap::sap_bwd_cpu);
}
