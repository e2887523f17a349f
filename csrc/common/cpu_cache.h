// The size of this machine's last-level cache, for CPU kernels that choose by whether their
// data likely sits in cache (the attention kernels' software prefetch, attention_cpu.cpp).
#pragma once

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif

#include <cstdint>
#include <fstream>
#include <string>

namespace flashsloth {
namespace cpu_cache {

// "32768K", "1M", "512" (bytes) as bytes; 0 when unreadable.
inline int64_t parse_size(const std::string& s) {
  int64_t n = 0;
  size_t i = 0;
  for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i) n = n * 10 + (s[i] - '0');
  if (i == 0) return 0;
  if (i == s.size()) return n;
  switch (s[i]) {
    case 'K': return n << 10;
    case 'M': return n << 20;
    case 'G': return n << 30;
    default: return 0;
  }
}

// Bytes of cpu0's highest-level data or unified cache as Linux sysfs lists it (what a guest
// sees of its own CPUs: on a 2-core Zen 4 VM sysconf(_SC_LEVEL3_CACHE_SIZE) said 320 MiB, the
// host's, and sysfs 32 MiB, one CCD's), else sysconf's level 3 / level 2 size, else 32 MiB.
// Read once.
inline int64_t last_level_bytes() {
  static const int64_t bytes = [] {
    int64_t best_level = 0, best = 0;
    for (int i = 0; i < 16; ++i) {
      const std::string dir =
          "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream lf(dir + "level"), tf(dir + "type"), sf(dir + "size");
      int64_t level = 0;
      std::string type, size;
      if (!(lf >> level) || !(tf >> type) || !(sf >> size) || type == "Instruction") continue;
      const int64_t n = parse_size(size);
      if (n > 0 && level > best_level) {
        best_level = level;
        best = n;
      }
    }
    if (best > 0) return best;
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)  // glibc
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l3 > 0) return int64_t(l3);
    if (l2 > 0) return int64_t(l2);
#endif
    return int64_t(32) << 20;
  }();
  return bytes;
}

}  // namespace cpu_cache
}  // namespace flashsloth
