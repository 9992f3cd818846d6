// Streaming copies for large CPU outputs (see stream_copy.h).
#include "stream_copy.h"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define L2P_FAST_STREAM_STORES 1
#endif

namespace l2p_fast {
namespace {

// The size of CPU 0's level-3 cache from sysfs ("32768K"), 0 when there is none to read.
int64_t sysfs_l3_bytes() {
  for (int index = 0; index < 8; ++index) {
    const std::string folder = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(folder + "level"), size_file(folder + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || level != 3 || !(size_file >> size) || size.empty()) continue;
    const int64_t unit = size.back() == 'K' ? 1024 : size.back() == 'M' ? 1024 * 1024 : 1;
    try {
      return std::stoll(size) * unit;
    } catch (...) {
      return 0;
    }
  }
  return 0;
}

// Half the last-level cache: sysfs first (glibc's sysconf reports 10x the real L3 on some AMD VMs,
// 320 MiB for 32 MiB), then sysconf, then 32 MiB.
int64_t default_threshold() {
  int64_t cache = sysfs_l3_bytes();
#ifdef _SC_LEVEL3_CACHE_SIZE
  if (cache <= 0) cache = static_cast<int64_t>(sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
  if (cache <= 0) cache = int64_t{32} << 20;
  return cache / 2;
}

std::atomic<int64_t>& threshold() {
  static std::atomic<int64_t> value{default_threshold()};
  return value;
}

}  // namespace

int64_t stream_threshold() { return threshold().load(std::memory_order_relaxed); }

void set_stream_threshold(int64_t bytes) {
  threshold().store(bytes < 0 ? default_threshold() : bytes, std::memory_order_relaxed);
}

bool stream_output(int64_t bytes) {
#ifdef L2P_FAST_STREAM_STORES
  return bytes >= stream_threshold();
#else
  (void)bytes;
  return false;
#endif
}

void stream_copy(void* dst, const void* src, size_t bytes) {
#ifdef L2P_FAST_STREAM_STORES
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  size_t head = (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15;  // to the first 16-byte boundary
  if (head > bytes) head = bytes;
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  size_t i = 0;
  for (; i + 64 <= bytes; i += 64) {  // a cache line per iteration: four 16-byte streaming stores
    const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i v2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i v3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), v0);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), v1);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), v2);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), v3);
  }
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(dst, src, bytes);
#endif
}

void stream_fence() {
#ifdef L2P_FAST_STREAM_STORES
  _mm_sfence();
#endif
}

}  // namespace l2p_fast
