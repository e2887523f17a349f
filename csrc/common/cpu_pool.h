// Large output buffers of the CPU kernels, kept on release and handed to the next call that asks
// for the same size (a caching allocator, as PyTorch's CUDA one, for our own outputs only).
//
// Why: a fresh multi-MB tensor from the default CPU allocator is mmap'ed memory (glibc maps
// blocks over 32 MB, and smaller ones once its heap was trimmed), so the kernel's first write
// to each 4 KB page takes a page fault and the kernel zeroes the page: at B = 16 the attention
// backward's new dk / dv (75 MB) cost ~15 ms of a ~30 ms call in page faults alone (measured:
// `torch.empty(n).fill_(1)` 14.6 ms against 2.1 ms for the fill into touched memory). Training
// asks for the same sizes step after step, so a buffer released by one step serves the next.
//
// Only blocks of at least kMinBytes are pooled (smaller ones come from the heap, which keeps
// them touched); a released block is kept while the pool's idle bytes stay within the limit
// (FLASHSLOTH_CPU_POOL_MB, read in flashsloth_kernels/_env.py and set through
// `flashsloth::cpu_pool_set_limit`; 0 turns the pool off), else returned to the system.
// Allocations and releases are reported to the PyTorch profiler like the default allocator's,
// so memory profiles (and the benchmark's peak memory) still count these tensors.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace flashsloth {
namespace cpu_pool {

static constexpr size_t kMinBytes = size_t(1) << 20;
static constexpr size_t kAlign = 64;

class Pool {
 public:
  void* take(size_t n) {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = idle_.find(n);
      if (it != idle_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= n;
      }
      live_bytes_ += n;
    }
    if (p == nullptr) {
      p = std::aligned_alloc(kAlign, n);  // n is a multiple of kAlign (see round_up)
      if (p == nullptr) {
        std::lock_guard<std::mutex> g(mu_);
        live_bytes_ -= n;
        trim_locked(0);
      }
      TORCH_CHECK(p != nullptr, "flashsloth: out of memory allocating ", n, " bytes");
    }
    report(p, int64_t(n));
    return p;
  }

  void give(void* p, size_t n) {
    report(p, -int64_t(n));
    bool keep;
    {
      std::lock_guard<std::mutex> g(mu_);
      live_bytes_ -= n;
      keep = idle_bytes_ + n <= limit_;
      if (keep) {
        idle_[n].push_back(p);
        idle_bytes_ += n;
      }
    }
    if (!keep) std::free(p);
  }

  // Sets the idle-bytes limit and frees idle blocks above it; returns the previous limit.
  size_t set_limit(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    const size_t old = limit_;
    limit_ = bytes;
    trim_locked(limit_);
    return old;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(live_bytes_), int64_t(idle_bytes_), int64_t(limit_)};
  }

 private:
  void trim_locked(size_t keep) {
    for (auto& kv : idle_) {
      while (idle_bytes_ > keep && !kv.second.empty()) {
        std::free(kv.second.back());
        kv.second.pop_back();
        idle_bytes_ -= kv.first;
      }
    }
  }
  void report(void* p, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      size_t live, idle;
      {
        std::lock_guard<std::mutex> g(mu_);
        live = live_bytes_;
        idle = idle_bytes_;
      }
      c10::reportMemoryUsageToProfiler(p, delta, live, live + idle, c10::Device(c10::kCPU));
    }
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> idle_;
  size_t idle_bytes_ = 0, live_bytes_ = 0;
  size_t limit_ = size_t(1) << 30;
};

// Never destroyed: a tensor released at interpreter exit, after static destructors ran, still
// finds it. One per extension module (each op's _C links its own copy).
inline Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

inline size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// at::empty(sizes, opts) for a CPU output; large ones come from the pool.
inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = round_up(size_t(numel) * opts.dtype().itemsize());
  if (nbytes < kMinBytes || pool().stats()[2] == 0) return at::empty(sizes, opts);
  void* p = pool().take(nbytes);
  return at::from_blob(p, sizes, [nbytes](void* ptr) { pool().give(ptr, nbytes); }, opts);
}

inline at::Tensor empty_like(const at::Tensor& t) {
  return empty(t.sizes(), t.options());
}

inline std::vector<int64_t> pool_stats() { return pool().stats(); }
inline int64_t set_pool_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "flashsloth: the pool limit must be >= 0 bytes, got ", bytes);
  return int64_t(pool().set_limit(size_t(bytes)));
}

}  // namespace cpu_pool
}  // namespace flashsloth

// Defines <prefix>_pool_stats() -> int[] ([live bytes, idle bytes, limit]) and
// <prefix>_set_pool_limit(int bytes) -> int (the previous limit) in a TORCH_LIBRARY_FRAGMENT.
#define FS_DEFINE_POOL_OPS(m, prefix)                                              \
  m.def(prefix "_pool_stats() -> int[]", &flashsloth::cpu_pool::pool_stats);      \
  m.def(prefix "_set_pool_limit(int bytes) -> int", &flashsloth::cpu_pool::set_pool_limit)
