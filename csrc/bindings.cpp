// The one translation unit that includes <torch/extension.h>: the Python module l2p_fast._C and
// every op schema of the l2p_fast namespace. Kernels (csrc/cpu, csrc/cuda) register their
// implementations with TORCH_LIBRARY_IMPL under these names; fakes and autograd live in
// l2p_fast/ops.py.
#include <torch/extension.h>

TORCH_LIBRARY(l2p_fast, m) {
  // Query of each sample from its tokens: x (B, N, D) -> (q (B, D) in max(x.dtype, fp32),
  // argmax (B, D) int64: the token index each max came from; empty for mode 0).
  // mode: 0 mean, 1 max, 2 max + 2 * mean.
  m.def("query_reduce(Tensor x, int mode) -> (Tensor, Tensor)");
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
}
