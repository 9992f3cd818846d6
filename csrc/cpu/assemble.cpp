// CPU one-pass sequence assembly for the prompted ViT / text encoder:
//   out[b, 0]              = cls[b or 0, 0]                       (+ pos[0, 0])
//   out[b, 1 + j*Lp + l]   = prompt[idx[b, j], l]                 (+ pos[0, 1 + j*Lp + l])
//   out[b, 1 + K*Lp + n]   = x[b, n]                              (+ pos[0, 1 + K*Lp + n])
// written once into the final (B, 1 + K*Lp + N, D) buffer (the port: concat, concat, add).
// Inputs may be strided views (timm's patch embedding is a transposed view); mixed dtypes are cast
// to the promoted output dtype first (a no-op in the usual all-fp32 case).
// Backward of the prompt: grad_prompt[m, l] = sum over (b, j) with idx[b, j] == m, in (b, j) order
// (deterministic, no atomics). Ids outside [0, M) are clamped into it (math::clamp_id), as in every backend.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/output_cache.h"
#include "common/pool_math.h"

namespace l2p_fast {
namespace {

// Shape/dtype checks (the Python layer validates first; these guard direct op calls).
void check_assemble_inputs(const at::Tensor& x, const at::Tensor& prompt, const at::Tensor& idx,
                           const at::Tensor& cls, const c10::optional<at::Tensor>& pos) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) >= 1, "assemble: x must be (B, N, D) with B >= 1, got ", x.sizes());
  TORCH_CHECK(prompt.dim() == 3 && prompt.size(0) >= 1 && prompt.size(1) >= 1 && prompt.size(2) == x.size(2),
              "assemble: prompt must be (M, Lp, D) with D = ", x.size(2), ", got ", prompt.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == x.size(0) && idx.size(1) >= 1,
              "assemble: idx must be int64 (B, K) with B = ", x.size(0), ", got ", idx.scalar_type(), " ",
              idx.sizes());
  TORCH_CHECK(cls.dim() == 3 && (cls.size(0) == 1 || cls.size(0) == x.size(0)) && cls.size(1) == 1 &&
                  cls.size(2) == x.size(2),
              "assemble: cls must be (1 or B, 1, D), got ", cls.sizes());
  const int64_t seq = 1 + idx.size(1) * prompt.size(1) + x.size(1);
  if (pos.has_value()) {
    TORCH_CHECK(pos->dim() == 3 && pos->size(0) == 1 && pos->size(1) == seq && pos->size(2) == x.size(2),
                "assemble: pos must be (1, 1 + K*Lp + N, D) = (1, ", seq, ", ", x.size(2), "), got ", pos->sizes());
  }
  for (const at::Tensor* t : {&prompt, &idx, &cls}) {
    TORCH_CHECK(t->device() == x.device(), "assemble: every input must be on x's device ", x.device());
  }
  TORCH_CHECK(!pos.has_value() || pos->device() == x.device(), "assemble: pos must be on x's device");
}

at::ScalarType assemble_output_dtype(const at::Tensor& x, const at::Tensor& prompt, const at::Tensor& cls,
                                     const c10::optional<at::Tensor>& pos) {
  auto dtype = at::promote_types(at::promote_types(x.scalar_type(), prompt.scalar_type()), cls.scalar_type());
  return pos.has_value() ? at::promote_types(dtype, pos->scalar_type()) : dtype;
}

void check_prompt_grad_inputs(const at::Tensor& grad, const at::Tensor& idx, int64_t pool, int64_t length) {
  TORCH_CHECK(pool >= 1 && length >= 1, "assemble_prompt_grad: pool_size and length must be >= 1");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == grad.size(0),
              "assemble_prompt_grad: idx must be int64 (B, K), got ", idx.sizes());
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) >= 1 + idx.size(1) * length,
              "assemble_prompt_grad: grad must be (B, 1 + K*Lp + N, D), got ", grad.sizes());
  TORCH_CHECK(idx.device() == grad.device(), "assemble_prompt_grad: idx must be on grad's device");
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One output row of D values: dst[d] = src[d * src_step] (+ pos[d]).
template <typename scalar_t>
inline void write_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t src_step,
                      const scalar_t* __restrict__ pos, int64_t pos_step, int64_t width) {
  using acc_t = acc_type_t<scalar_t>;
  if (pos == nullptr) {
    if (src_step == 1) {
      for (int64_t d = 0; d < width; ++d) dst[d] = src[d];
    } else {
      for (int64_t d = 0; d < width; ++d) dst[d] = src[d * src_step];
    }
    return;
  }
  if (src_step == 1 && pos_step == 1) {
    for (int64_t d = 0; d < width; ++d) {
      dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) + static_cast<acc_t>(pos[d]));
    }
  } else {
    for (int64_t d = 0; d < width; ++d) {
      dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d * src_step]) + static_cast<acc_t>(pos[d * pos_step]));
    }
  }
}

// ``tile`` consecutive token rows whose x values are d-strided (x[n0 + t, d] = src[d * src_step + t]):
// dst[t * width + d] = src[d * src_step + t] (+ pos[t * pos_row + d * pos_step]).
template <typename scalar_t>
inline void copy_token_tile(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t src_step,
                            const scalar_t* __restrict__ pos, int64_t pos_row, int64_t pos_step, int64_t tile,
                            int64_t width) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t d = 0; d < width; ++d) {
    const scalar_t* column = src + d * src_step;
    for (int64_t t = 0; t < tile; ++t) {
      if (pos == nullptr) {
        dst[t * width + d] = column[t];
      } else {
        dst[t * width + d] =
            static_cast<scalar_t>(static_cast<acc_t>(column[t]) + static_cast<acc_t>(pos[t * pos_row + d * pos_step]));
      }
    }
  }
}

template <typename scalar_t>
void assemble_kernel(const at::Tensor& x, const at::Tensor& prompt, const at::Tensor& idx, const at::Tensor& cls,
                     const c10::optional<at::Tensor>& pos, at::Tensor& out) {
  const int64_t batch = x.size(0), tokens = x.size(1), width = x.size(2);
  const int64_t pool = prompt.size(0), length = prompt.size(1), top_k = idx.size(1);
  const int64_t prompt_len = top_k * length, seq = 1 + prompt_len + tokens;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* p_ptr = prompt.data_ptr<scalar_t>();
  const scalar_t* c_ptr = cls.data_ptr<scalar_t>();
  const scalar_t* pos_ptr = pos.has_value() ? pos->data_ptr<scalar_t>() : nullptr;
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  scalar_t* o_ptr = out.data_ptr<scalar_t>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t ps0 = prompt.stride(0), ps1 = prompt.stride(1), ps2 = prompt.stride(2);
  const int64_t cs0 = cls.size(0) == 1 ? 0 : cls.stride(0), cs2 = cls.stride(2);
  const int64_t qs1 = pos_ptr ? pos->stride(1) : 0, qs2 = pos_ptr ? pos->stride(2) : 0;
  const int64_t is0 = idx.stride(0), is1 = idx.stride(1);
  // grain: at least at::internal::GRAIN_SIZE elements per task, as ATen's own copy kernels, so small
  // sequences run on the calling thread instead of waking the OpenMP pool
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(width, 1));
  at::parallel_for(0, batch * seq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / seq, s = r % seq;
      const scalar_t* src;
      int64_t step;
      if (s == 0) {
        src = c_ptr + b * cs0;
        step = cs2;
      } else if (s <= prompt_len) {
        const int64_t j = (s - 1) / length, l = (s - 1) % length;
        const int64_t id = math::clamp_id(idx_ptr[b * is0 + j * is1], pool);
        src = p_ptr + id * ps0 + l * ps1;
        step = ps2;
      } else if (xs1 == 1 && xs2 != 1) {
        // transposed tokens (timm's patch embedding): copy a tile of up to 16 token rows at once, so
        // each cache line of x (consecutive tokens) is used by all rows of the tile
        const int64_t n0 = s - 1 - prompt_len;
        const int64_t tile = std::min<int64_t>({int64_t{16}, end - r, tokens - n0});
        copy_token_tile<scalar_t>(o_ptr + r * width, x_ptr + b * xs0 + n0, xs2,
                                  pos_ptr ? pos_ptr + s * qs1 : nullptr, qs1, qs2, tile, width);
        r += tile - 1;
        continue;
      } else {
        src = x_ptr + b * xs0 + (s - 1 - prompt_len) * xs1;
        step = xs2;
      }
      write_row<scalar_t>(o_ptr + r * width, src, step, pos_ptr ? pos_ptr + s * qs1 : nullptr, qs2, width);
    }
  });
}

at::Tensor assemble_cpu(const at::Tensor& x_in, const at::Tensor& prompt_in, const at::Tensor& idx,
                        const at::Tensor& cls_in, const c10::optional<at::Tensor>& pos_in) {
  check_assemble_inputs(x_in, prompt_in, idx, cls_in, pos_in);
  const auto dtype = assemble_output_dtype(x_in, prompt_in, cls_in, pos_in);
  const at::Tensor x = x_in.to(dtype), prompt = prompt_in.to(dtype), cls = cls_in.to(dtype);
  c10::optional<at::Tensor> pos;
  if (pos_in.has_value()) pos = pos_in->to(dtype);
  const int64_t seq = 1 + idx.size(1) * prompt.size(1) + x.size(1);
  at::Tensor out = empty_output({x.size(0), seq, x.size(2)}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "assemble_cpu",
                                  [&] { assemble_kernel<scalar_t>(x, prompt, idx, cls, pos, out); });
  return out;
}

template <typename scalar_t>
void prompt_grad_kernel(const at::Tensor& grad, const at::Tensor& idx, int64_t pool, int64_t length,
                        at::Tensor& out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t batch = grad.size(0), width = grad.size(2), top_k = idx.size(1);
  const scalar_t* g_ptr = grad.data_ptr<scalar_t>();
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  scalar_t* o_ptr = out.data_ptr<scalar_t>();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  const int64_t is0 = idx.stride(0), is1 = idx.stride(1);
  // every (m, l) row scans the B*K ids and adds ~B*K*D/M values: parallel only when the whole sum is big
  const int64_t work = batch * top_k * length * width + pool * length * batch * top_k;
  const int64_t grain = work < at::internal::GRAIN_SIZE ? pool * length : 1;
  at::parallel_for(0, pool * length, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(width);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t m = r / length, l = r % length;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t j = 0; j < top_k; ++j) {
          if (math::clamp_id(idx_ptr[b * is0 + j * is1], pool) != m) continue;
          const scalar_t* row = g_ptr + b * gs0 + (1 + j * length + l) * gs1;
          for (int64_t d = 0; d < width; ++d) acc[d] += static_cast<acc_t>(row[d]);
        }
      }
      scalar_t* dst = o_ptr + r * width;
      for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

at::Tensor assemble_prompt_grad_cpu(const at::Tensor& grad_in, const at::Tensor& idx, int64_t pool,
                                    int64_t length) {
  check_prompt_grad_inputs(grad_in, idx, pool, length);
  const at::Tensor grad = grad_in.stride(2) == 1 ? grad_in : grad_in.contiguous();
  at::Tensor out = at::empty({pool, length, grad.size(2)}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "assemble_prompt_grad_cpu",
                                  [&] { prompt_grad_kernel<scalar_t>(grad, idx, pool, length, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p_fast, CPU, m) {
  m.impl("assemble", &assemble_cpu);
  m.impl("assemble_prompt_grad", &assemble_prompt_grad_cpu);
}

}  // namespace l2p_fast
