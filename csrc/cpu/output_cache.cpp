// The reuse cache of large CPU outputs (see common/output_cache.h). A c10::Allocator whose blocks
// go back to a list of free blocks when their storage dies; an allocation takes the most recently
// released block of its rounded size (warm in cache). Blocks of 2 MiB and more are mapped directly,
// 2 MiB-aligned and advised to use transparent huge pages. Unused bytes stay below a limit (L2P_FAST_CPU_CACHE_MB,
// default 1024 MB; 0 turns it off); older blocks are freed first. Allocations and releases are reported to PyTorch's
// CPU memory profiler like the default allocator's, so profiled peaks stay comparable.
#include "common/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/accumulate.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <deque>
#include <iterator>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace l2p_fast {
namespace {

constexpr size_t kGranule = 64 * 1024;     // sizes are rounded up to this, so near sizes share blocks
constexpr size_t kHugePage = 2 * 1024 * 1024;  // blocks of at least this size are 2 MiB-aligned and
                                               // asked to be backed by transparent huge pages

size_t rounded_size(size_t nbytes) { return (nbytes + kGranule - 1) / kGranule * kGranule; }

// Fresh memory for a block: huge pages (where the kernel grants them) mean a few TLB entries for a
// streamed output instead of thousands, and one fault per 2 MiB on first touch. Blocks of 2 MiB and
// more are mapped directly (never from malloc's heap, whose pages may already be populated with 4 KiB
// pages that the huge-page advice does not convert), 2 MiB-aligned, and unmapped when dropped.
void* fresh_block(size_t size) {
  if (size < kHugePage) {
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, 64, size) == 0 && ptr != nullptr,
                "l2p_fast output cache: out of memory allocating ", size, " bytes");
    return ptr;
  }
  const size_t span = size + kHugePage;  // room to align the start to 2 MiB
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "l2p_fast output cache: out of memory mapping ", span, " bytes");
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > start) munmap(raw, aligned - start);  // the unaligned head
  const uintptr_t end = aligned + size, raw_end = start + span;
  if (raw_end > end) munmap(reinterpret_cast<void*>(end), raw_end - end);  // the tail past the block
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
  return reinterpret_cast<void*>(aligned);
}

// `size` is the block's rounded size, as passed to fresh_block.
void free_block(void* ptr, size_t size) {
  if (size < kHugePage) {
    std::free(ptr);
  } else {
    munmap(ptr, size);
  }
}

// The largest limit in megabytes whose byte count fits an int64_t.
constexpr long long kMaxLimitMb = std::numeric_limits<int64_t>::max() >> 20;

int64_t limit_from_env() {
  const char* value = std::getenv("L2P_FAST_CPU_CACHE_MB");
  if (value == nullptr || *value == '\0') return int64_t{1024} << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && errno != ERANGE && mb >= 0 && mb <= kMaxLimitMb,
              "L2P_FAST_CPU_CACHE_MB: expected a non-negative integer (megabytes) of at most ", kMaxLimitMb, ", got '",
              value, "'");
  return static_cast<int64_t>(mb) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = rounded_size(nbytes);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // the most recently released block of this size first: it is the likeliest to be in cache
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->first == size) {
          ptr = it->second;
          free_.erase(std::next(it).base());
          cached_ -= static_cast<int64_t>(size);
          break;
        }
      }
      ptr != nullptr ? ++hits_ : ++misses_;
    }
    if (ptr == nullptr) ptr = fresh_block(size);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_.emplace(ptr, size);
      in_use_ += static_cast<int64_t>(size);
    }
    c10::profiledCPUMemoryReporter().New(ptr, nbytes);  // the requested bytes, as the default allocator reports
    return {ptr, ptr, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &OutputCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, cached_, static_cast<int64_t>(free_.size()), in_use_, hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    std::deque<std::pair<size_t, void*>> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      trim_locked(0, dropped);
    }
    for (auto& block : dropped) free_block(block.second, block.first);
  }

  // Free every unused block (the limit stays).
  void clear() {
    std::deque<std::pair<size_t, void*>> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(free_);
      cached_ = 0;
    }
    for (auto& block : dropped) free_block(block.second, block.first);
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may die after static teardown
    return *cache;
  }

 private:
  static void release(void* ptr) { instance().give_back(ptr); }

  void give_back(void* ptr) {
    c10::profiledCPUMemoryReporter().Delete(ptr);
    std::deque<std::pair<size_t, void*>> dropped;
    bool keep = false;
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(ptr);
      TORCH_INTERNAL_ASSERT(it != live_.end(), "l2p_fast output cache: release of an unknown block");
      size = it->second;
      live_.erase(it);
      in_use_ -= static_cast<int64_t>(size);
      if (static_cast<int64_t>(size) <= limit_) {
        trim_locked(static_cast<int64_t>(size), dropped);
        free_.emplace_back(size, ptr);
        cached_ += static_cast<int64_t>(size);
        keep = true;
      }
    }
    if (!keep) free_block(ptr, size);
    for (auto& block : dropped) free_block(block.second, block.first);
  }

  // Move the oldest free blocks to `dropped` until `incoming` more bytes fit under the limit.
  void trim_locked(int64_t incoming, std::deque<std::pair<size_t, void*>>& dropped) {
    while (!free_.empty() && cached_ + incoming > limit_) {
      cached_ -= static_cast<int64_t>(free_.front().first);
      dropped.push_back(free_.front());
      free_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<std::pair<size_t, void*>> free_;  // (rounded size, block), oldest first
  std::unordered_map<void*, size_t> live_;     // blocks handed out and not yet released
  int64_t limit_;
  int64_t cached_ = 0, in_use_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().type() != c10::DeviceType::CPU) return at::empty(sizes, options);
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t numel = c10::multiply_integers(sizes);
  OutputCache& cache = OutputCache::instance();
  if (numel * static_cast<int64_t>(c10::elementSize(dtype)) < kOutputCacheMinBytes || cache.limit() == 0) {
    return new_empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

OutputCacheStats output_cache_stats() { return OutputCache::instance().stats(); }

void output_cache_clear() { OutputCache::instance().clear(); }

void output_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "limit_bytes: expected >= 0, got ", bytes);
  OutputCache::instance().set_limit(bytes);
}

}  // namespace l2p_fast
