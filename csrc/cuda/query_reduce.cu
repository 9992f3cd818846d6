// CUDA query reduction (docs/behaviour.md §4.1): one thread per (row, feature), tokens walked in order so the
// first maximum wins and NaN propagates, as on the CPU (math::replaces_max).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/pool_math.h"

namespace l2p_fast {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void reduce_rows_kernel(const scalar_t* __restrict__ x, int64_t batch, int64_t tokens,
                                   int64_t width, int64_t mode, acc_t* __restrict__ q,
                                   int64_t* __restrict__ argmax) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * width) return;
  const int64_t b = i / width, d = i % width;
  const scalar_t* row = x + b * tokens * width + d;
  acc_t sum = 0;
  acc_t best = -INFINITY;
  int64_t best_n = 0;
  for (int64_t n = 0; n < tokens; ++n) {
    const acc_t v = static_cast<acc_t>(row[n * width]);
    sum += v;
    if (math::replaces_max(v, best)) {  // as torch.max: NaN wins, then the first maximum
      best = v;
      best_n = n;
    }
  }
  const acc_t mean = sum / static_cast<acc_t>(tokens);
  q[i] = mode == 0 ? mean : (mode == 1 ? best : best + acc_t(2) * mean);
  if (argmax != nullptr) argmax[i] = best_n;
}

std::tuple<at::Tensor, at::Tensor> query_reduce_cuda(const at::Tensor& x_in, int64_t mode) {
  TORCH_CHECK(x_in.dim() == 3, "query_reduce: x must be (B, N, D), got ", x_in.sizes());
  TORCH_CHECK(mode >= 0 && mode <= 2, "query_reduce: mode must be 0, 1 or 2, got ", mode);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor q = at::empty({x.size(0), x.size(2)}, x.options().dtype(acc_type));
  at::Tensor argmax = at::empty({mode == 0 ? 0 : x.size(0), mode == 0 ? 0 : x.size(2)},
                                x.options().dtype(at::kLong));
  const int64_t total = x.size(0) * x.size(2);
  if (total == 0) return {q, argmax};
  const int threads = 256;
  const int blocks = static_cast<int>((total + threads - 1) / threads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "query_reduce_cuda", [&] {
    int64_t* arg_ptr = mode == 0 ? nullptr : argmax.data_ptr<int64_t>();
    if (acc_type == at::kDouble) {
      reduce_rows_kernel<scalar_t, double><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), mode, q.data_ptr<double>(), arg_ptr);
    } else {
      reduce_rows_kernel<scalar_t, float><<<blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), mode, q.data_ptr<float>(), arg_ptr);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p_fast, CUDA, m) { m.impl("query_reduce", &query_reduce_cuda); }

}  // namespace l2p_fast
