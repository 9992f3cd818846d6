// CPU query reduction (SPEC §4.1): mean / max / max + 2*mean over the N tokens of each row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "common/pool_math.h"

namespace l2p_fast {
namespace {

template <typename scalar_t, typename acc_t>
void reduce_rows(const at::Tensor& x, int64_t mode, at::Tensor& q, at::Tensor& argmax) {
  const int64_t batch = x.size(0), tokens = x.size(1), width = x.size(2);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  acc_t* q_ptr = q.data_ptr<acc_t>();
  int64_t* arg_ptr = mode == 0 ? nullptr : argmax.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = x_ptr + b * tokens * width;
      acc_t* out = q_ptr + b * width;
      for (int64_t d = 0; d < width; ++d) {
        acc_t sum = 0;
        acc_t best = -std::numeric_limits<acc_t>::infinity();
        int64_t best_n = 0;
        for (int64_t n = 0; n < tokens; ++n) {
          const acc_t v = static_cast<acc_t>(row[n * width + d]);
          sum += v;
          if (math::replaces_max(v, best)) {  // as torch.max: NaN wins, then the first maximum
            best = v;
            best_n = n;
          }
        }
        const acc_t mean = sum / static_cast<acc_t>(tokens);
        out[d] = mode == 0 ? mean : (mode == 1 ? best : best + acc_t(2) * mean);
        if (arg_ptr != nullptr) arg_ptr[b * width + d] = best_n;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> query_reduce_cpu(const at::Tensor& x_in, int64_t mode) {
  TORCH_CHECK(x_in.dim() == 3, "query_reduce: x must be (B, N, D), got ", x_in.sizes());
  TORCH_CHECK(mode >= 0 && mode <= 2, "query_reduce: mode must be 0, 1 or 2, got ", mode);
  const at::Tensor x = x_in.contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor q = at::empty({x.size(0), x.size(2)}, x.options().dtype(acc_type));
  at::Tensor argmax = at::empty({mode == 0 ? 0 : x.size(0), mode == 0 ? 0 : x.size(2)},
                                x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "query_reduce", [&] {
    if (acc_type == at::kDouble) {
      reduce_rows<scalar_t, double>(x, mode, q, argmax);
    } else {
      reduce_rows<scalar_t, float>(x, mode, q, argmax);
    }
  });
  return {q, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p_fast, CPU, m) { m.impl("query_reduce", &query_reduce_cpu); }

}  // namespace l2p_fast
