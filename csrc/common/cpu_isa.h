// Instruction-set variants of the C++ CPU kernels, shared by every op's *_cpu.cpp.
//
// The CPU extensions are built without -march flags so one wheel runs on every x86-64 CPU; an
// op's hot loops live in a header that its *_cpu.cpp includes once per instruction set, each
// time in its own namespace under its own `#pragma GCC target` (see csrc/README.md). This
// header holds what every op needs around that: whether the compiler can build the x86
// variants (FS_X86_VARIANTS), what this CPU can run, and IsaTable, the list of an op's
// compiled variants with the one in use (the widest this CPU runs unless the Python side
// forces another: FLASHSLOTH_CPU_ISA, read in flashsloth_kernels/_env.py).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>
#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FS_X86_VARIANTS 1
#else
#define FS_X86_VARIANTS 0
#endif

namespace flashsloth {
namespace cpu_isa {

// Whether this CPU runs the variant named `isa` ("avx512bf16": AVX-512F / VL + AVX512-BF16 +
// AVX2 + FMA, "avx512": AVX-512F / VL + AVX2 + FMA, "avx2": AVX2 + FMA, "baseline": always).
inline bool cpu_runs(const std::string& isa) {
#if FS_X86_VARIANTS
  __builtin_cpu_init();
  // F16C (fp16 conversion) comes with every AVX2 CPU; checked since the avx2 variants use it
  const bool fma = __builtin_cpu_supports("fma"),
             avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  // AVX-512VL (EVEX-encoded 128 / 256-bit ops, so narrow vectors reach all 32 registers) comes
  // with every AVX-512 CPU but the Xeon Phi; the attention kernels' narrow tails use it
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  if (isa == "avx512bf16") return avx512 && __builtin_cpu_supports("avx512bf16") && avx2 && fma;
  if (isa == "avx512") return avx512 && avx2 && fma;
  if (isa == "avx2") return avx2 && fma;
#endif
  return isa == "baseline";
}

// An op's compiled variants, widest first (each K names itself in a `const char* isa` member),
// and the one in use. `op` names the op in error messages.
template <typename K>
class IsaTable {
 public:
  IsaTable(const char* op, std::vector<K> compiled) : op_(op) {
    for (const K& k : compiled) variants_.push_back({k, cpu_runs(k.isa)});
  }

  // The variant in use: the widest this CPU runs unless set() chose another.
  const K& get() {
    const K* k = current_.load(std::memory_order_acquire);
    if (k == nullptr) {
      k = widest();
      current_.store(k, std::memory_order_release);
    }
    return *k;
  }

  // "auto" or a variant name; an unknown name or a variant this CPU cannot run is an error
  // naming the ones it can. Returns the variant now in use.
  std::string set(const std::string& isa) {
    const K* chosen = isa == "auto" ? widest() : nullptr;
    for (const Variant& v : variants_)
      if (isa == v.k.isa && v.runs) chosen = &v.k;
    TORCH_CHECK(chosen != nullptr, op_, ": instruction set '", isa,
                "' is not available on this CPU / build; expected auto or one of: ",
                c10::Join(", ", supported()));
    current_.store(chosen, std::memory_order_release);
    return chosen->isa;
  }

  // The compiled variants this CPU runs, widest first.
  std::vector<std::string> supported() const {
    std::vector<std::string> r;
    for (const Variant& v : variants_)
      if (v.runs) r.emplace_back(v.k.isa);
    return r;
  }

 private:
  struct Variant {
    K k;
    bool runs;
  };
  const K* widest() const {
    for (const Variant& v : variants_)
      if (v.runs) return &v.k;
    return &variants_.back().k;
  }
  const char* op_;
  std::vector<Variant> variants_;
  std::atomic<const K*> current_{nullptr};
};

}  // namespace cpu_isa
}  // namespace flashsloth
