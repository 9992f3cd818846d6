// Large CPU outputs (the (B, K*Lp+N, D) sequence, token gradients) come from a small reuse cache
// instead of a fresh malloc: glibc hands big blocks back to the kernel when they are freed, so every
// call would page-fault and zero tens of MB before writing them (slower than the copy itself). A
// block freed by its last tensor goes back to the cache (bounded, see output_cache.cpp) and is
// handed out again to the next output of the same rounded size. CUDA tensors use at::empty.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>

namespace l2p_fast {

// An uninitialised tensor of `sizes` (contiguous) with `options`; on the CPU straight from
// at::detail::empty_cpu, the function at::empty ends in, without the dispatcher's round trip (about 4,500
// instructions each: at small shapes the ten outputs' at::empty calls cost more than the kernels).
inline at::Tensor new_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu()) return at::Tensor(at::detail::empty_cpu(sizes, options));
  return at::empty(sizes, options);
}

// An uninitialised tensor of `sizes` (contiguous) with `options`; CPU tensors of at least
// kOutputCacheMinBytes come from the reuse cache.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

constexpr int64_t kOutputCacheMinBytes = 256 * 1024;

struct OutputCacheStats {
  int64_t limit_bytes;   // most bytes kept while unused
  int64_t cached_bytes;  // bytes held now, unused
  int64_t cached_blocks;
  int64_t in_use_bytes;  // bytes of live tensors that came from the cache
  int64_t hits;          // allocations served from the cache
  int64_t misses;        // allocations that needed fresh memory
};

OutputCacheStats output_cache_stats();
// Free every unused block (live tensors keep theirs; they come back on release, within the limit).
void output_cache_clear();
// Set the most bytes kept unused (0 turns the cache off: every output is a fresh allocation).
void output_cache_set_limit(int64_t bytes);

}  // namespace l2p_fast
