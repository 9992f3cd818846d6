// The one translation unit that includes <torch/extension.h>: the Python module l2p_fast._C and
// every op schema of the l2p_fast namespace. Kernels (csrc/cpu, csrc/cuda) register their
// implementations with TORCH_LIBRARY_IMPL under these names; fakes and autograd live in
// l2p_fast/ops.py.
#include <torch/extension.h>

#include "common/output_cache.h"
#include "cpu/stream_copy.h"

TORCH_LIBRARY(l2p_fast, m) {
  // Query of each sample from its tokens: x (B, N, D) -> (q (B, D) in max(x.dtype, fp32),
  // argmax (B, D) int64: the token index each max came from; empty for mode 0).
  // mode: 0 mean, 1 max, 2 max + 2 * mean.
  m.def("query_reduce(Tensor x, int mode) -> (Tensor, Tensor)");
  // Fused prompt pool (docs/behaviour.md §4), kernels in csrc/cpu/pool.cpp and csrc/cuda/pool.cu.
  // mode: 0 mean, 1 max, 2 max + 2 * mean, 3 cls_features. Returns (prompted (B, K*Lp+N, D),
  // x_embed_norm, prompt_norm, similarity, idx (B, K) int64, selected_key, reduce_sim, and for the
  // backward: argmax (B, D) int32 or (0,), q_sumsq (B,), k_sumsq (M,)). frequency (M,): the diversified
  // selection's frequencies (docs/behaviour.md §8); vote_counts (M,) int: the batch vote picks its winners from
  // these counts instead of its own (the global vote, §9).
  m.def(
      "pool_forward(Tensor x_embed, Tensor? cls_features, Tensor prompt, Tensor keys, Tensor? prompt_mask, "
      "int mode, int top_k, bool batchwise, Tensor? frequency=None, Tensor? vote_counts=None) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The local half of the global vote (docs/behaviour.md §9): counts (M,) int64 of the rows holding each prompt
  // among their top-K (diversified when frequency is given). Not differentiable.
  m.def(
      "pool_vote_counts(Tensor x_embed, Tensor? cls_features, Tensor keys, Tensor? frequency, int mode, "
      "int top_k) -> Tensor");
  // Gradients (x_embed, cls_features, prompt, keys) of pool_forward; (0,)-shaped where not needed.
  // A missing gradient of x_embed_norm, prompt_norm, similarity or selected_key means zero (an output
  // the loss does not use): its terms are skipped instead of summing a tensor of zeros.
  m.def(
      "pool_backward(Tensor grad_prompted, Tensor? grad_x_embed_norm, Tensor? grad_prompt_norm, "
      "Tensor? grad_similarity, Tensor? grad_selected_key, Tensor grad_reduce_sim, Tensor x_embed_norm, "
      "Tensor prompt_norm, Tensor q_sumsq, Tensor k_sumsq, Tensor idx, Tensor argmax, int mode, int length, "
      "ScalarType x_dtype, ScalarType query_dtype, ScalarType prompt_dtype, ScalarType keys_dtype, bool need_x, "
      "bool need_query, bool need_prompt, bool need_keys) -> (Tensor, Tensor, Tensor, Tensor)");
  // One-pass sequence assembly of the prompted models (csrc/cpu/assemble.cpp, csrc/cuda/assemble.cu):
  // [cls (1|B, 1, D), prompt[idx] (B, K*Lp, D), x (B, N, D)] + pos (1, 1+K*Lp+N, D) written once,
  // in the promoted dtype. assemble_prompt_grad: grad (B, S, D) -> (M, Lp, D), the deterministic
  // per-prompt sum over the rows that selected it.
  m.def("assemble(Tensor x, Tensor prompt, Tensor idx, Tensor cls, Tensor? pos) -> Tensor");
  m.def("assemble_prompt_grad(Tensor grad, Tensor idx, int pool_size, int length) -> Tensor");
}

static bool built_with_cuda() {
#ifdef L2P_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "l2p_fast native kernels (ops are registered under torch.ops.l2p_fast)";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def(
      "cpu_output_cache_stats",
      [] {
        const l2p_fast::OutputCacheStats s = l2p_fast::output_cache_stats();
        return std::map<std::string, int64_t>{{"limit_bytes", s.limit_bytes},   {"cached_bytes", s.cached_bytes},
                                              {"cached_blocks", s.cached_blocks}, {"in_use_bytes", s.in_use_bytes},
                                              {"hits", s.hits},                   {"misses", s.misses}};
      },
      "counters of the reuse cache of large CPU outputs");
  m.def("cpu_output_cache_clear", &l2p_fast::output_cache_clear, "free the unused blocks of the CPU output cache");
  m.def("cpu_output_cache_set_limit", &l2p_fast::output_cache_set_limit, py::arg("limit_bytes"),
        "most bytes the CPU output cache keeps unused (0: off)");
  m.def("cpu_stream_threshold", &l2p_fast::stream_threshold,
        "bytes from which CPU outputs are written with streaming stores");
  m.def("cpu_set_stream_threshold", &l2p_fast::set_stream_threshold, py::arg("bytes"),
        "set the streaming-store threshold in bytes (-1: the default, half the last-level cache)");
}
