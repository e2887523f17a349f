// C++ CPU kernels of flashsloth::query_patch_attention (few queries against many keys).
//
// The CPU kernels of torch.ops.flashsloth.query_patch_attention_fwd / _bwd; the Python host
// functions (flashsloth_kernels/attention/fused_cpu.py) call them. Inputs are validated by
// the public function; the TORCH_CHECKs here repeat the checks that keep memory safe.
//
// Speed: the kernels (attention_cpu_kernels.h) are compiled three times, for AVX-512, AVX2
// and the baseline instruction set (the extension is built without -march flags so that
// one wheel runs everywhere), and the widest one the CPU supports is picked at first use.
// Work runs as one parallel task per (b, h) and key split (plus query superblock in the
// forward); the split count depends on the shape only, never on the thread count, so
// results are the same bit for bit whatever the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention_cpu.h"
#include "common/cpu_cache.h"
#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"
#include "common/cpu_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the fp32 gathers of the AVX-512 / AVX2 kernels
#endif


namespace flashsloth {
namespace attention {

namespace baseline {
#define FS_VEC_BYTES 16
#include "attention_cpu_kernels.h"
#undef FS_VEC_BYTES
}  // namespace baseline

#if FS_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define FS_VEC_BYTES 32
#include "attention_cpu_kernels.h"
#undef FS_VEC_BYTES
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma,f16c")
namespace avx512 {
#define FS_VEC_BYTES 64
#include "attention_cpu_kernels.h"
#undef FS_VEC_BYTES
}  // namespace avx512
#pragma GCC pop_options

// AVX-512 plus AVX512-BF16 (Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later): the
// avx512 kernels, with the bf16 forward's scores by vdpbf16ps (FS_BF16_DOT)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {
#define FS_VEC_BYTES 64
#define FS_BF16_DOT 1
#include "attention_cpu_kernels.h"
#undef FS_BF16_DOT
#undef FS_VEC_BYTES
}  // namespace avx512bf16
#pragma GCC pop_options
#endif

namespace {

using FwdFn = void (*)(const FwdParams&, DType, int64_t);
using BwdFn = void (*)(const BwdParams&, DType, int64_t);

struct Kernels {
  const char* isa;
  FwdFn fwd;
  BwdFn bwd;
  // whether a few queries past a multiple of 16 get a forward superblock of their own (see
  // attention_fwd): on AVX2 the forward runs such a sparse query block in key lanes anyway
  bool split_query_tail;
};

// Every variant compiled into this build, widest first, and the one in use (the Python side
// applies FLASHSLOTH_CPU_ISA, read in flashsloth_kernels/_env.py, before each call).
cpu_isa::IsaTable<Kernels>& isa_table() {
  static cpu_isa::IsaTable<Kernels> t("query_patch_attention", {
#if FS_X86_VARIANTS
      {"avx512bf16", avx512bf16::fwd_unit, avx512bf16::bwd_unit, true},
      {"avx512", avx512::fwd_unit, avx512::bwd_unit, true},
      {"avx2", avx2::fwd_unit, avx2::bwd_unit, false},
#endif
      {"baseline", baseline::fwd_unit, baseline::bwd_unit, true}});
  return t;
}

const Kernels& kernels() { return isa_table().get(); }
std::string set_attention_isa(const std::string& isa) { return isa_table().set(isa); }
std::vector<std::string> supported_attention_isas() { return isa_table().supported(); }

// Forward and backward prefetch the K and V rows a few chunks ahead in software only when the
// call's K and V together exceed this many bytes: by default a quarter of the last-level cache
// (cpu_cache.h), the size below which they likely still sit there from the op that made them
// (or the previous call). From cache the hardware prefetchers keep up, and the software
// prefetches cost instructions and L1 room; from DRAM they are what keeps the loads fed.
// Measured on a 2-core AMD EPYC Zen 4 VM (32 MiB L3; kernel op, fp32, H = 32, Lk = 729, one
// process each, 20 interleaved rounds, medians, no prefetch / prefetch): B = 1 (5 MB of K and
// V) Lq = 1 0.75-0.81x, Lq = 2 0.83-0.87x, Lq = 9 0.97-0.98x, Lq = 17 0.93-0.94x (1 and 2
// threads); B = 16 (81 MB) Lq = 2 1.55x, Lq = 1 and 9 0.88-1.46x depending on the process.
// The backward at B = 1: Lq = 9 0.98x (2 threads) / 0.99x (1), Lq = 1 0.93x.
// set_prefetch_min_bytes (tests, tuning) overrides it; < 0 restores the default.
std::atomic<int64_t> g_prefetch_min_bytes{-1};

int64_t prefetch_min_bytes() {
  const int64_t v = g_prefetch_min_bytes.load(std::memory_order_relaxed);
  return v >= 0 ? v : cpu_cache::last_level_bytes() / 4;
}

// Whether a call on these K and V prefetches (forward and backward alike).
bool prefetch_for(const at::Tensor& k, const at::Tensor& v) {
  return (k.numel() + v.numel()) * int64_t(k.element_size()) > prefetch_min_bytes();
}

int64_t set_prefetch_min_bytes(int64_t n) {
  const int64_t old = prefetch_min_bytes();
  g_prefetch_min_bytes.store(n < 0 ? -1 : n, std::memory_order_relaxed);
  return old;
}

// Parallel tasks wanted from the key splits when B * H alone is small. A constant, not the
// thread count, so the split (and the rounding) never depends on the machine's threads.
constexpr int64_t kTargetUnits = 16;
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kQuerySuperblock = 64;
// Below this many multiply-adds a parallel region costs more than it saves (and on a busy
// machine far more): such calls run on the calling thread.
constexpr int64_t kMinParallelWork = 1 << 16;

// Units per parallel task, so that tiny problems (gradcheck, Lk = 1) stay serial.
int64_t grain_for(int64_t units, int64_t work_per_unit) {
  const int64_t per = std::max<int64_t>(1, work_per_unit);
  return std::max<int64_t>(1, std::min(units, (kMinParallelWork + per - 1) / per));
}

void choose_split(Shape& s) {
  const int64_t bh = s.B * s.H;
  int64_t nsplit = 1;
  if (bh < kTargetUnits) {
    const int64_t want = (kTargetUnits + bh - 1) / bh;
    const int64_t most = std::max<int64_t>(1, s.Lk / kMinSplitKeys);
    nsplit = std::min(want, most);
  }
  s.split_len = (s.Lk + nsplit - 1) / nsplit;
  s.nsplit = (s.Lk + s.split_len - 1) / s.split_len;
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK(false, "query_patch_attention (cpu): unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const char* where, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, where,
              ": q, k, v must be 4-D (B, H, L, D), got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), where,
              ": expected CPU tensors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), where,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == Dk, where, ": k of shape ",
              k.sizes(), " does not match q of shape ", q.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == Lk, where, ": v of shape ",
              v.sizes(), " does not match k of shape ", k.sizes());
  TORCH_CHECK(Dk >= 1 && Dk <= 256 && v.size(3) >= 1 && v.size(3) <= 256, where,
              ": head sizes must be in 1..256, got Dk = ", Dk, ", Dv = ", v.size(3));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, where, ": scale must be finite and > 0, got ",
              scale);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B &&
                    m.size(1) == Lk && m.device().is_cpu(),
                where, ": key_padding_mask must be a CPU bool tensor of shape (", B, ", ", Lk,
                "), got ", m.scalar_type(), " ", m.sizes());
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in,
                                                 const std::optional<at::Tensor>& mask_in,
                                                 double scale) {
  check_inputs("query_patch_attention_fwd", q_in, k_in, v_in, mask_in, scale);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Shape s{};
  s.B = q.size(0);
  s.H = q.size(1);
  s.Lq = q.size(2);
  s.Dk = q.size(3);
  s.Lk = k.size(2);
  s.Dv = v.size(3);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor out = at::empty({s.B, s.H, s.Lq, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Lq}, q.options().dtype(acc));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.Lk == 0) {  // no key at all: every row is "all masked"
    out.zero_();
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  choose_split(s);
  s.qsb_len = std::min(s.Lq, kQuerySuperblock);
  // One to four queries past a multiple of 16 (Lq = 17: 16 + 1) get a superblock of their
  // own, so the forward runs them with lanes over keys instead of a query block of 16 lanes
  // holding them (the unit after, on the same thread, finds K and V in L2). Measured on Zen 4,
  // B = 1, one thread, 4 interleaved rounds: Lq = 17 0.83 -> 0.69 ms, Lq = 20 0.86 -> 0.82 ms;
  // a tail of 8 (Lq = 24) was 2.5% slower split, so it stays in its query block. Not on AVX2,
  // whose forward runs a superblock with sparse query blocks (17 of 24 lanes) in key lanes
  // whole: Zen 3, Lk = 729, 5 interleaved rounds, medians, split -> whole: B = 1 Lq = 17
  // 0.82 -> 0.66 ms, B = 16 13.8 -> 11.5 ms (2 threads).
  if (kernels().split_query_tail && s.Lq > 16 && s.Lq <= kQuerySuperblock && s.Lq % 16 != 0 &&
      s.Lq % 16 <= 4)
    s.qsb_len = s.Lq - s.Lq % 16;
  s.nqsb = (s.Lq + s.qsb_len - 1) / s.qsb_len;

  FwdParams P{};
  P.s = s;
  P.q = q.data_ptr();
  P.k = k.data_ptr();
  P.v = v.data_ptr();
  P.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  P.scale = scale;
  P.prefetch = prefetch_for(k, v);
  P.out = out.data_ptr();
  P.lse = lse.data_ptr();
  at::Tensor part_o, part_lse;
  if (s.nsplit > 1) {
    part_o = at::empty({s.nsplit, s.B, s.H, s.Lq, s.Dv}, q.options().dtype(acc));
    part_lse = at::empty({s.nsplit, s.B, s.H, s.Lq}, q.options().dtype(acc));
    P.part_o = part_o.data_ptr();
    P.part_lse = part_lse.data_ptr();
  }
  const DType dt = dtype_of(q);
  const FwdFn fwd = kernels().fwd;
  const int64_t units = s.B * s.H * s.nqsb * s.nsplit;
  const int64_t grain = grain_for(units, s.qsb_len * s.split_len * (s.Dk + s.Dv));
  // the superblocks and splits of one head on one thread (they share its K and V)
  parallel_units(units, grain, s.nqsb * s.nsplit, [&](int64_t u) { fwd(P, dt, u); });
  if (s.nsplit > 1) {
    // Merge the splits: lse = logsumexp_s lse_s, out = sum_s exp(lse_s - lse) out_s.
    const int64_t rows = s.B * s.H * s.Lq;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qpa_merge", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* po = part_o.data_ptr<acc_t>();
      const acc_t* pl = part_lse.data_ptr<acc_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      acc_t* l = lse.data_ptr<acc_t>();
      const int64_t merge_grain = grain_for(rows, s.nsplit * s.Dv);
      at::parallel_for(0, rows, merge_grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          // NaN-propagating max: a split whose row is NaN (a non-finite attended score)
          // makes the merged row NaN (std::max would drop it).
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          for (int64_t sp = 0; sp < s.nsplit; ++sp) {
            const acc_t x = pl[sp * rows + r];
            m = (x > m || x != x || m != m) ? (m != m ? m : x) : m;
          }
          scalar_t* orow = o + r * s.Dv;
          if (m == -std::numeric_limits<acc_t>::infinity()) {
            for (int64_t d = 0; d < s.Dv; ++d) orow[d] = scalar_t(0);
            l[r] = std::numeric_limits<acc_t>::infinity();
            continue;
          }
          acc_t total = 0;
          for (int64_t sp = 0; sp < s.nsplit; ++sp) total += std::exp(pl[sp * rows + r] - m);
          for (int64_t d = 0; d < s.Dv; ++d) {
            acc_t x = 0;
            for (int64_t sp = 0; sp < s.nsplit; ++sp)
              x += std::exp(pl[sp * rows + r] - m) * po[(sp * rows + r) * s.Dv + d];
            orow[d] = scalar_t(x / total);
          }
          l[r] = m + std::log(total);
        }
      });
    });
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& mask_in, double scale,
    const at::Tensor& out_in, const at::Tensor& lse_in) {
  check_inputs("query_patch_attention_bwd", q_in, k_in, v_in, mask_in, scale);
  const auto acc = acc_type(q_in.scalar_type());
  const std::vector<int64_t> osize{q_in.size(0), q_in.size(1), q_in.size(2), v_in.size(3)};
  const at::IntArrayRef out_shape(osize);
  TORCH_CHECK(dout_in.sizes() == out_shape && out_in.sizes() == out_shape,
              "query_patch_attention_bwd: grad_out and out must have shape ", out_shape, ", got ",
              dout_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(dout_in.scalar_type() == q_in.scalar_type() &&
                  out_in.scalar_type() == q_in.scalar_type(),
              "query_patch_attention_bwd: grad_out and out must have q's dtype");
  TORCH_CHECK(lse_in.scalar_type() == acc && lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(1) && lse_in.size(2) == q_in.size(2),
              "query_patch_attention_bwd: lse must be ", acc, " of shape (B, H, Lq), got ",
              lse_in.scalar_type(), " ", lse_in.sizes());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  Shape s{};
  s.B = q.size(0);
  s.H = q.size(1);
  s.Lq = q.size(2);
  s.Dk = q.size(3);
  s.Lk = k.size(2);
  s.Dv = v.size(3);
  at::Tensor dq = cpu_pool::empty_like(q), dk = cpu_pool::empty_like(k), dv = cpu_pool::empty_like(v);
  if (s.B * s.H == 0) return {dq, dk, dv};
  if (s.Lq == 0 || s.Lk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  choose_split(s);
  s.qsb_len = s.Lq;
  s.nqsb = 1;
  BwdParams P{};
  P.s = s;
  P.dout = dout.data_ptr();
  P.q = q.data_ptr();
  P.k = k.data_ptr();
  P.v = v.data_ptr();
  P.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  P.scale = scale;
  P.prefetch = prefetch_for(k, v);
  P.out = out.data_ptr();
  P.lse = lse.data_ptr();
  P.dq = dq.data_ptr();
  P.dk = dk.data_ptr();
  P.dv = dv.data_ptr();
  at::Tensor part_dq;
  if (s.nsplit > 1) {
    part_dq = at::empty({s.nsplit, s.B, s.H, s.Lq, s.Dk}, q.options().dtype(acc));
    P.part_dq = part_dq.data_ptr();
  }
  const DType dt = dtype_of(q);
  const BwdFn bwd = kernels().bwd;
  const int64_t units = s.B * s.H * s.nsplit;
  const int64_t grain = grain_for(units, 2 * s.Lq * s.split_len * (s.Dk + s.Dv));
  parallel_units(units, grain, 1, [&](int64_t u) { bwd(P, dt, u); });
  if (s.nsplit > 1) {
    // dq = sum of the splits' shares, in split order (deterministic).
    const int64_t n = s.B * s.H * s.Lq * s.Dk;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qpa_dq_sum", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* src = part_dq.data_ptr<acc_t>();
      scalar_t* dst = dq.data_ptr<scalar_t>();
      at::parallel_for(0, n, grain_for(n, s.nsplit), [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          acc_t x = 0;
          for (int64_t sp = 0; sp < s.nsplit; ++sp) x += src[sp * n + e];
          dst[e] = scalar_t(x);
        }
      });
    });
  }
  return {dq, dk, dv};
}

std::string attention_isa() { return kernels().isa; }

}  // namespace

// The schemas of flashsloth::query_patch_attention_fwd / _bwd are defined once for every device
// by flashsloth_kernels/attention/op.py (fused.define_kernels); this file registers their CPU
// kernels (csrc/attention/attention_cuda.cpp the CUDA forward). The ISA and output-pool queries are CPU-only.
TORCH_LIBRARY_FRAGMENT(flashsloth, m) {
  m.def("query_patch_attention_isa() -> str", &attention_isa);
  m.def("query_patch_attention_set_isa(str isa) -> str", &set_attention_isa);
  m.def("query_patch_attention_supported_isas() -> str[]", &supported_attention_isas);
  m.def("query_patch_attention_prefetch_min_bytes() -> int", &prefetch_min_bytes);
  m.def("query_patch_attention_set_prefetch_min_bytes(int n) -> int", &set_prefetch_min_bytes);
  FS_DEFINE_POOL_OPS(m, "query_patch_attention");
}

TORCH_LIBRARY_IMPL(flashsloth, CPU, m) {
  m.impl("query_patch_attention_fwd",
         [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& key_padding_mask, double scale,
            int64_t /*num_splits: CUDA only; the CPU kernel chooses its own split*/) {
           return attention_fwd(q, k, v, key_padding_mask, scale);
         });
  m.impl("query_patch_attention_bwd", &attention_bwd);
}

}  // namespace attention
}  // namespace flashsloth
