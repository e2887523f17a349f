// Dynamic scheduling of independent work units over ATen's intra-op threads.
//
// at::parallel_for splits [0, n) into one contiguous range per thread up front: on a shared
// machine a thread that loses its core for a while (another process, the hypervisor) leaves
// the others idle at the end of the call, waiting on its range. Here each thread takes the
// next `step` units from a shared counter until none are left, so a slowed thread only holds
// up the units it is running. Which thread runs a unit never changes what the unit computes
// (units write disjoint outputs), so results stay the same bit for bit.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace flashsloth {

// fn(u) for every u in [0, units), `step` consecutive units at a time (units that share data,
// e.g. the query superblocks of one head, stay on one thread), in parallel when at least
// `grain` units are there (at::parallel_for's grain: fewer run on the calling thread).
template <typename Fn>
inline void parallel_units(int64_t units, int64_t grain, int64_t step, const Fn& fn) {
  if (units <= 0) return;
  step = std::max<int64_t>(1, step);
  grain = std::max<int64_t>(1, grain);
  const int64_t threads = std::min<int64_t>(
      at::get_num_threads(), std::min((units + grain - 1) / grain, (units + step - 1) / step));
  if (threads <= 1) {
    for (int64_t u = 0; u < units; ++u) fn(u);
    return;
  }
  // guided: a grab is a share of what is left (in whole steps), so the first ones are long
  // contiguous runs (a thread's next unit is the one its prefetches ran into) and the last
  // ones single steps
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      int64_t u0 = next.load(std::memory_order_relaxed), u1;
      do {
        if (u0 >= units) return;
        const int64_t left = (units - u0 + step - 1) / step;
        u1 = std::min(units, u0 + std::max<int64_t>(1, left / (2 * threads)) * step);
      } while (!next.compare_exchange_weak(u0, u1, std::memory_order_relaxed));
      for (int64_t u = u0; u < u1; ++u) fn(u);
    }
  });
}

}  // namespace flashsloth
