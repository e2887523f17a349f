// Fused CPU kernels of spatial attention pooling (SAP): the CPU kernels of
// torch.ops.flashsloth.spatial_attention_pool_fwd and _bwd (schemas: csrc/README.md). The math is flashsloth_kernels/sap/reference.py's; shapes:
//   x: (B, N = H * W, C), w1: (Ch, C), b1: (Ch,) or None, w2: (Ch,), b2: (1,) or None,
//   dropout_mask: (B, N, Ch) bool or None, grad_out / out: (B, G, C).
//
// The op is one (B*N x C) x (C x Ch) GEMM plus a few passes over x, so the design keeps the
// GEMMs in MKL/oneDNN (at::mm) and fuses everything else into one parallel pass each way:
//   forward:  z = x W1^T (at::mm; b1 stays out of the GEMM and is added in the epilogue), then
//             one pass over windows: score the window's rows from z, max-subtracted softmax,
//             weighted sum of the x rows.
//   backward: recompute z (the forward saves no (B, N, Ch) activation), one pass over strips of
//             windows: scores, softmax, ds, dx_direct = alpha * g, then
//             dz = ds * w2 * mask * scale * [z + b1 > 0] written over z while accumulating the
//             strip's partials of dw2 and db1; then dW1 = dz^T x (at::mm) and
//             dx = dx_direct + dz W1 (at::addmm_ into dx_direct).
// Elementwise work runs in float32 (float64 for float64 inputs). None of our sums depends on the
// thread count: a window is handled by one thread, sums across rows go through per-strip partials
// (the strips are fixed by the problem) added up in strip order. (The GEMMs are MKL's / oneDNN's.)
// The two passes (sap_cpu_kernels.h) are compiled for AVX-512, AVX2 and the baseline
// instruction set and the widest the CPU runs is used (csrc/common/cpu_isa.h;
// spatial_attention_pool_isa() reports it, FLASHSLOTH_CPU_ISA forces one).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_pool.h"
#include "sap_cpu.h"

namespace flashsloth {
namespace sap {

namespace baseline {
#include "sap_cpu_kernels.h"
}  // namespace baseline

#if FS_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "sap_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
#include "sap_cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

using at::Tensor;

struct Kernels {
  const char* isa;
  void (*fwd)(const FwdArgs&, int64_t, int64_t);
  void (*bwd)(const BwdArgs&, int64_t, int64_t);
};

cpu_isa::IsaTable<Kernels>& kernels() {
  static cpu_isa::IsaTable<Kernels> t("spatial_attention_pool", {
#if FS_X86_VARIANTS
      // SAP has no AVX512-BF16 code (its 16-bit GEMMs are oneDNN's): the name is shared by
      // every op, so FLASHSLOTH_CPU_ISA=avx512bf16 runs SAP's avx512 kernels
      {"avx512bf16", avx512::fwd_range, avx512::bwd_range},
      {"avx512", avx512::fwd_range, avx512::bwd_range},
      {"avx2", avx2::fwd_range, avx2::bwd_range},
#endif
      {"baseline", baseline::fwd_range, baseline::bwd_range}});
  return t;
}

template <typename T>
DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::f32;
  else if constexpr (std::is_same_v<T, double>) return DType::f64;
  else if constexpr (std::is_same_v<T, c10::Half>) return DType::f16;
  else return DType::bf16;
}

// Least work (row elements touched) a parallel task gets, about a quarter of a millisecond of
// one core; smaller passes run on the calling thread. At 2^21 the forward's pass at B = 1
// (27x27, C = 1152: 1.7M elements) ran on one thread while the GEMM before it used both cores:
// 1.09-1.10x the bare GEMM on an idle 2-core machine, 1.05-1.07x split in two (2026-12-05).
// On a shared, oversubscribed CPU a parallel region waits until all its threads have been
// scheduled (a 2-thread pass once took ~13 ms there against ~2 ms inline); the GEMM before it
// waits the same way, so the split follows the work, not the load.
constexpr int64_t kMinTaskWork = int64_t(1) << 19;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (kMinTaskWork + work_per_item - 1) / work_per_item);
}

// Per-call constants of the scorer, in acc_t: b1 (zeros when None), w2 * scale (scale = the
// dropout scale with a mask, else 1), b2 (0 when None).
template <typename acc_t>
struct Scorer {
  std::vector<acc_t> b1, w2s;
  acc_t b2 = 0, scale = 1;
  Scorer(const std::optional<Tensor>& b1_, const Tensor& w2_, const std::optional<Tensor>& b2_,
         bool masked, double dropout_scale, int64_t Ch)
      : b1(Ch, acc_t(0)), w2s(Ch), scale(masked ? static_cast<acc_t>(dropout_scale) : acc_t(1)) {
    const at::ScalarType st = c10::CppTypeToScalarType<acc_t>::value;
    if (b1_.has_value()) {
      const Tensor t = b1_->to(st).contiguous();
      std::copy(t.const_data_ptr<acc_t>(), t.const_data_ptr<acc_t>() + Ch, b1.begin());
    }
    const Tensor t2 = w2_.to(st).contiguous();
    const acc_t* w2 = t2.const_data_ptr<acc_t>();
    for (int64_t k = 0; k < Ch; ++k) w2s[k] = w2[k] * scale;
    if (b2_.has_value()) b2 = b2_->to(st).item<acc_t>();
  }
  ScorerArgs args() const { return {b1.data(), w2s.data(), double(b2), double(scale)}; }
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

// z = x W1^T for 16-bit x with a float32 z, on oneDNN's brgemm micro-kernel (16-bit operands,
// fp32 accumulation and output: AMX / AVX-512 BF16 / FP16 where the CPU has them). ATen's CPU
// GEMMs with 16-bit operands round the output to 16 bits, and the contract wants z in fp32, so
// without this the forward converts x to fp32 for MKL's sgemm (~3.5x slower at B = 1 on a
// Sapphire Rapids core). Products of 16-bit numbers are exact in fp32, so z is the same
// function as the fp32 path's (up to the order of the fp32 sums). Returns an undefined tensor
// when the micro-kernel is not available here (torch without it, a CPU without a fast 16-bit
// path, odd C): the caller then takes the fp32 path.
template <typename T>
Tensor gemm_lowp_f32(const Tensor& x2, const Tensor& w1) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    const at::ScalarType st = c10::CppTypeToScalarType<T>::value;
    const int64_t M = x2.size(0), K = x2.size(1), N = w1.size(0);
    // the packed (VNNI) layout pairs rows of K; a tile of B is K x kBN
    if (K % 2 != 0 || !at::native::cpublas::could_pack(st)) return Tensor();
    constexpr int64_t kBN = 64, kBM = 32, kRowsPerTask = 256;
    const int64_t nb = (N + kBN - 1) / kBN;
    // B = W1^T (K x N), zero-padded to nb * kBN columns and packed per column block of kBN
    // (block j: K x kBN, row stride kBN); a tail block is multiplied with its real width.
    Tensor bt = at::zeros({K, nb * kBN}, w1.options());
    bt.narrow(1, 0, N).copy_(w1.t());
    Tensor packed = at::empty({nb * K * kBN}, w1.options());
    const T* bp = bt.const_data_ptr<T>();
    T* pp = packed.mutable_data_ptr<T>();
    try {
      for (int64_t j = 0; j < nb; ++j)
        at::native::cpublas::pack(K, kBN, nb * kBN, kBN, st, st, bp + j * kBN, pp + j * K * kBN);
    } catch (const c10::Error&) {
      return Tensor();  // a oneDNN that cannot pack this shape: the fp32 path
    }
    Tensor z = cpu_pool::empty({M, N}, x2.options().dtype(at::kFloat));
    const T* xp = x2.const_data_ptr<T>();
    float* zp = z.mutable_data_ptr<float>();
    // Tasks of kRowsPerTask rows: their A rows stay in L2 while every packed block of B (one
    // block in L1 / L2 at a time) passes over them.
    const int64_t tasks = (M + kRowsPerTask - 1) / kRowsPerTask;
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = t * kRowsPerTask, m1 = std::min(M, m0 + kRowsPerTask);
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t bn = std::min(kBN, N - j * kBN);
          for (int64_t m = m0; m < m1; m += kBM) {
            at::native::cpublas::brgemm(std::min(kBM, m1 - m), bn, K, K, kBN, N, false,
                                        xp + m * K, pp + j * K * kBN, zp + m * N + j * kBN);
          }
        }
      }
      at::native::cpublas::brgemm_release();
    });
    return z;
  }
#endif
  (void)x2;
  (void)w1;
  return Tensor();
}

// T: x's dtype. The hidden activations z = x W1^T are float32 (float64 for float64) whatever T
// is (the numeric contract: a 16-bit z overflows at 65504 in float16 and rounds the scores
// twice): for 16-bit x the GEMM runs on the brgemm micro-kernel where lowp_gemm says the CPU
// has a fast 16-bit path (gemm_lowp_f32), else x is converted once for an fp32 GEMM; the
// weighted sum reads x in its own dtype.
template <typename T>
Tensor fwd_impl(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                const Tensor& w2, const std::optional<Tensor>& b2, const Windows& win,
                const std::optional<Tensor>& mask, double scale, bool lowp_gemm) {
  using acc_t = at::opmath_type<T>;
  const at::ScalarType acc_st = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Ch = w1.size(0);
  // b1 stays out of the GEMM: the epilogue adds it, which spares a broadcast copy into z.
  Tensor z;
  if (lowp_gemm) z = gemm_lowp_f32<T>(x.view({B * N, C}), w1.contiguous());
  if (!z.defined()) {
    z = cpu_pool::empty({B * N, Ch}, x.options().dtype(acc_st));
    at::mm_out(z, x.to(acc_st).view({B * N, C}), w1.to(acc_st).t());
  }
  Tensor out = at::empty({B, win.G, C}, x.options());
  Scorer<acc_t> sc(b1, w2, b2, mask.has_value(), scale, Ch);
  const FwdArgs a{sc.args(), win, B, N, C, Ch, dtype_of<T>(), z.const_data_ptr<acc_t>(),
                  x.const_data_ptr<T>(), mask ? mask->const_data_ptr<bool>() : nullptr,
                  out.mutable_data_ptr<T>()};
  const auto fwd = kernels().get().fwd;
  const int64_t wmax = win.kh * win.kw;
  at::parallel_for(0, B * win.G, grain_for(wmax * (Ch + C)),
                   [&](int64_t begin, int64_t end) { fwd(a, begin, end); });
  return out;
}

Tensor sap_fwd_cpu(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                   const Tensor& w2, const std::optional<Tensor>& b2, int64_t kh, int64_t kw,
                   int64_t H, int64_t W, const std::optional<Tensor>& dropout_mask,
                   double dropout_scale, bool lowp_gemm) {
  check_inputs(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask);
  const Windows win(H, W, kh, kw);
  Tensor xc = x.contiguous();
  std::optional<Tensor> mask;
  if (dropout_mask.has_value()) mask = dropout_mask->contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sap_fwd_cpu", [&] {
    out = fwd_impl<scalar_t>(xc, w1, b1, w2, b2, win, mask, dropout_scale, lowp_gemm);
  });
  return out;
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
  // recomputed: the forward saves no (B, N, Ch) activation (16-bit D: on the brgemm
  // micro-kernel from the 16-bit operands, as the forward)
  Tensor z;
  if constexpr (!kInPlace) z = gemm_lowp_f32<D>(x.contiguous().view({M, C}), w1.contiguous());
  if (!z.defined()) {
    z = cpu_pool::empty({M, Ch}, acc_opts);
    at::mm_out(z, xa, w1a.t());
  }
  Scorer<acc_t> sc(b1, w2, b2, mask.has_value(), scale, Ch);
  const bool* mp = mask ? mask->const_data_ptr<bool>() : nullptr;
  const Tensor g = gout.to(acc_st).contiguous();
  Tensor ds = at::empty({M}, acc_opts);
  Tensor dx = need_x ? cpu_pool::empty({M, C}, x.options().dtype(d_st)) : Tensor();
  Tensor dz = kInPlace ? z : cpu_pool::empty({M, Ch}, x.options().dtype(d_st));
  const int64_t nstrips = B * win.Gh;
  // per-strip partials of (dw2, db1): fixed by the problem, not by the thread count
  Tensor part = need_w ? at::zeros({nstrips, 2 * Ch}, acc_opts) : Tensor();
  const BwdArgs a{sc.args(), win, B, N, C, Ch, dtype_of<D>(), z.mutable_data_ptr<acc_t>(),
                  dz.mutable_data_ptr<D>(), xa.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(),
                  mp, ds.mutable_data_ptr<acc_t>(), need_x ? dx.mutable_data_ptr<D>() : nullptr,
                  need_w ? part.mutable_data_ptr<acc_t>() : nullptr};
  const auto bwd = kernels().get().bwd;
  const int64_t strip_work = win.kh * win.W * 2 * (Ch + C);
  // One parallel region for the whole pass: on a shared, oversubscribed CPU each region start
  // costs a scheduling wait.
  at::parallel_for(0, nstrips, grain_for(strip_work),
                   [&](int64_t begin, int64_t end) { bwd(a, begin, end); });
  const Tensor xd = kInPlace ? xa : x.contiguous().view({M, C});
  const Tensor w1d = kInPlace ? w1a : w1.contiguous();

  Tensor dw1, db1, dw2, db2;
  if (need_w) {
    dw1 = at::mm(dz.t(), xd);
    // Strip partials summed in strip order, whatever the thread count. Serial: 2 Ch adds per
    // strip, less than a parallel region costs on a busy machine. dw2 and db1 get their own
    // buffers: the op's outputs must not alias one another.
    dw2 = at::zeros({Ch}, acc_opts);
    db1 = at::zeros({Ch}, acc_opts);
    {
      const acc_t* pp = part.const_data_ptr<acc_t>();
      acc_t* __restrict o1 = dw2.mutable_data_ptr<acc_t>();
      acc_t* __restrict o2 = db1.mutable_data_ptr<acc_t>();
      for (int64_t st = 0; st < nstrips; ++st) {
        const acc_t* p = pp + st * 2 * Ch;
        for (int64_t k = 0; k < Ch; ++k) o1[k] += p[k];
        for (int64_t k = 0; k < Ch; ++k) o2[k] += p[Ch + k];
      }
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

std::string sap_isa() { return kernels().get().isa; }
std::string sap_set_isa(const std::string& isa) { return kernels().set(isa); }
std::vector<std::string> sap_supported_isas() { return kernels().supported(); }

}  // namespace
}  // namespace sap
}  // namespace flashsloth

// The instruction-set and output-pool queries are CPU-only and defined here (the op schemas in op.py).
TORCH_LIBRARY_FRAGMENT(flashsloth, m) {
  m.def("spatial_attention_pool_isa() -> str", &flashsloth::sap::sap_isa);
  m.def("spatial_attention_pool_set_isa(str isa) -> str", &flashsloth::sap::sap_set_isa);
  m.def("spatial_attention_pool_supported_isas() -> str[]", &flashsloth::sap::sap_supported_isas);
  FS_DEFINE_POOL_OPS(m, "spatial_attention_pool");
}

// The schemas of flashsloth::spatial_attention_pool_fwd / _bwd are defined once for every device
// by flashsloth_kernels/sap/op.py (fused.define_kernels); this file registers their CPU kernels
// (csrc/sap/sap_cuda.cpp the CUDA forward).
TORCH_LIBRARY_IMPL(flashsloth, CPU, m) {
  m.impl("spatial_attention_pool_fwd",
         [](const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
            const at::Tensor& w2, const std::optional<at::Tensor>& b2, int64_t kh, int64_t kw,
            int64_t H, int64_t W, const std::optional<at::Tensor>& dropout_mask,
            double dropout_scale, bool lowp_gemm, int64_t /*images_per_chunk: CUDA only*/) {
           return flashsloth::sap::sap_fwd_cpu(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask,
                                               dropout_scale, lowp_gemm);
         });
  m.impl("spatial_attention_pool_bwd", &flashsloth::sap::sap_bwd_cpu);
}
