// Copies into outputs larger than the last-level cache with non-temporal (streaming) stores.
// A regular store first reads the destination line into the cache (read for ownership), and an output
// bigger than the cache is evicted before anyone reads it, so a regular copy into it moves its bytes
// three times (read the line, write it back, plus the source read) and evicts the caller's working set.
// Streaming stores write whole lines straight to memory: the source read and the write only.
// Outputs that fit in the cache keep regular stores: their next reader (the backward, the transformer)
// finds them there.
#pragma once

#include <cstddef>
#include <cstdint>

namespace l2p_fast {

// Whether an output of `bytes` is written with streaming stores: bytes >= the threshold (default: half
// of the last-level cache reported by the OS, or 16 MiB when it reports none; two such outputs alive at
// once, as in a training loop that still holds the previous step's, already fill the cache).
bool stream_output(int64_t bytes);
int64_t stream_threshold();
// Set the threshold in bytes (0: every output streams; a huge value: none does); -1 restores the default.
void set_stream_threshold(int64_t bytes);

// dst[0:bytes] = src[0:bytes] with streaming stores where the CPU has them (x86-64), memcpy elsewhere.
// Unaligned heads and tails go through memcpy. Call stream_fence() before the data is read elsewhere
// (at the end of each parallel task).
void stream_copy(void* dst, const void* src, size_t bytes);
void stream_fence();

// memcpy, or stream_copy when `streaming`.
inline void copy_bytes(void* dst, const void* src, size_t bytes, bool streaming) {
  if (streaming) {
    stream_copy(dst, src, bytes);
  } else {
    __builtin_memcpy(dst, src, bytes);
  }
}

}  // namespace l2p_fast
