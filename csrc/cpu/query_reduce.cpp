// CPU query reduction (docs/behaviour.md §4.1): mean / max / max + 2*mean over the N tokens of each row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/pool_math.h"

namespace l2p_fast {
namespace {

// Row by row: for each batch row the N tokens are read in order, each a contiguous D-length run added into
// D-length accumulators (the inner loop over D vectorises). Per column the tokens are summed in order and
// the maximum is taken as torch.max does (the first NaN wins, else the first maximum).
template <typename scalar_t, typename acc_t>
void reduce_rows(const at::Tensor& x, int64_t mode, at::Tensor& q, at::Tensor& argmax) {
  // token ids as wide as acc_t, so that the max loop selects on lanes of one width (N < 2^31 checked)
  using index_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  const int64_t batch = x.size(0), tokens = x.size(1), width = x.size(2);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  acc_t* q_ptr = q.data_ptr<acc_t>();
  int64_t* arg_ptr = mode == 0 ? nullptr : argmax.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(width), best(mode == 0 ? 0 : width);
    std::vector<index_t> best_at(mode == 0 ? 0 : width);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = x_ptr + b * tokens * width;
      acc_t* out = q_ptr + b * width;
      int64_t* arg = arg_ptr == nullptr ? nullptr : arg_ptr + b * width;
      acc_t* sum_ptr = sum.data();
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t n = 0; n < tokens; ++n) {
        const scalar_t* token = row + n * width;
        for (int64_t d = 0; d < width; ++d) sum_ptr[d] += static_cast<acc_t>(token[d]);
      }
      const acc_t count = static_cast<acc_t>(tokens);
      if (mode == 0) {
        for (int64_t d = 0; d < width; ++d) out[d] = sum_ptr[d] / count;
        continue;
      }
      acc_t* best_ptr = best.data();
      index_t* at_ptr = best_at.data();
      std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(best_at.begin(), best_at.end(), index_t{0});
      for (int64_t n = 0; n < tokens; ++n) {
        const scalar_t* token = row + n * width;
        const index_t token_id = static_cast<index_t>(n);
        for (int64_t d = 0; d < width; ++d) {  // selects on lanes of one width: the loop vectorises
          const acc_t v = static_cast<acc_t>(token[d]);
          const bool replace = math::replaces_max(v, best_ptr[d]);  // as torch.max: NaN wins, then the first
          best_ptr[d] = replace ? v : best_ptr[d];
          at_ptr[d] = replace ? token_id : at_ptr[d];
        }
      }
      for (int64_t d = 0; d < width; ++d) {
        out[d] = mode == 1 ? best_ptr[d] : best_ptr[d] + acc_t(2) * (sum_ptr[d] / count);
        arg[d] = at_ptr[d];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> query_reduce_cpu(const at::Tensor& x_in, int64_t mode) {
  TORCH_CHECK(x_in.dim() == 3, "query_reduce: x must be (B, N, D), got ", x_in.sizes());
  TORCH_CHECK(mode >= 0 && mode <= 2, "query_reduce: mode must be 0, 1 or 2, got ", mode);
  TORCH_CHECK(x_in.size(1) <= std::numeric_limits<int32_t>::max(), "query_reduce: x must have N < 2^31 tokens, got ",
              x_in.size(1));
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
