// CUDA fused prompt pool (docs/behaviour.md §4): the same ops as csrc/cpu/pool.cpp for CUDA tensors, on the
// current stream under a device guard. Per-row arithmetic (dot products with fixed lanes, inverse
// norms, the tie rule, the l2n gradient, the query) comes from common/pool_math.h, shared with the
// CPU kernels; every reduction runs in a fixed order, so results are deterministic (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/pool_host.h"
#include "common/pool_math.h"

namespace l2p_fast {
namespace {

using math::cast_to;

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// ----------------------------------------------------------------------------------------------
// Forward kernels
// ----------------------------------------------------------------------------------------------

// One thread per (b, d): copies x[b, :, d] into prompted[b, K*Lp:, d] (unless out is null) and reduces the query.
template <typename x_t, typename out_t, typename acc_t>
__global__ void tokens_kernel(const x_t* __restrict__ x, out_t* __restrict__ out, acc_t* __restrict__ q,
                              int32_t* __restrict__ argmax, int64_t batch, int64_t tokens, int64_t width,
                              int64_t offset, int64_t mode) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * width) return;
  const int64_t b = i / width, d = i % width, seq = offset + tokens;
  const x_t* src = x + b * tokens * width + d;
  out_t* dst = out == nullptr ? nullptr : out + (b * seq + offset) * width + d;
  acc_t sum = 0, best = -INFINITY;
  int32_t arg = 0;
  for (int64_t n = 0; n < tokens; ++n) {
    const x_t v = src[n * width];
    if (dst != nullptr) dst[n * width] = cast_to<out_t>(v);
    if (mode == kModeCls) continue;
    const acc_t a = cast_to<acc_t>(v);
    sum += a;
    if (math::replaces_max(a, best)) {  // as torch.max: NaN wins, then the first maximum
      best = a;
      arg = static_cast<int32_t>(n);
    }
  }
  if (mode == kModeCls) return;
  q[i] = math::finish_query(mode, sum, best, tokens);
  if (argmax != nullptr) argmax[i] = arg;
}

// One thread per row: squared norm (fixed-lane dot) and the normalised row.
template <typename acc_t>
__global__ void normalise_kernel(const acc_t* __restrict__ v, acc_t* __restrict__ out, acc_t* __restrict__ sumsq,
                                 int64_t rows, int64_t width) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const acc_t s = math::row_dot(v + r * width, v + r * width, width);
  sumsq[r] = s;
  const acc_t inv = math::inverse_norm(s);
  for (int64_t d = 0; d < width; ++d) out[r * width + d] = v[r * width + d] * inv;
}

// One thread per row b: similarity row and (when choose) its top-K by the tie rule, diversified when freq is
// given; with a mask (not choose, clamp) idx holds the mask's ids, which are clamped.
template <typename acc_t>
__global__ void score_kernel(const acc_t* __restrict__ xn, const acc_t* __restrict__ kn, acc_t* __restrict__ sim,
                             int64_t* __restrict__ idx, const acc_t* __restrict__ freq, int64_t batch, int64_t pool,
                             int64_t width, int64_t top_k, bool choose, bool clamp) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  acc_t* row = sim + b * pool;
  for (int64_t m = 0; m < pool; ++m) row[m] = math::row_dot(xn + b * width, kn + m * width, width);
  if (clamp) {  // idx holds a copy of prompt_mask: clamp out-of-range ids
    for (int64_t k = 0; k < top_k; ++k) idx[b * top_k + k] = math::clamp_id(idx[b * top_k + k], pool);
  }
  if (!choose) return;
  for (int64_t m = 0; m < pool; ++m) {
    const int64_t rank = math::selection_rank(row, freq, pool, m);
    if (rank < top_k) idx[b * top_k + rank] = m;
  }
}

// Single thread: counts[m] = the rows of idx (B, K) that hold id m.
__global__ void count_kernel(const int64_t* __restrict__ idx, int64_t* __restrict__ counts, int64_t batch,
                             int64_t pool, int64_t top_k) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  for (int64_t m = 0; m < pool; ++m) counts[m] = 0;
  for (int64_t i = 0; i < batch * top_k; ++i) ++counts[idx[i]];
}

// Single thread: the batch vote (counts over M ids, winners by count desc, lower id first); the counts are
// counted from idx unless given (counted = false: the global vote's all-reduced counts).
__global__ void vote_kernel(int64_t* __restrict__ idx, int64_t* __restrict__ counts, int64_t batch, int64_t pool,
                            int64_t top_k, bool counted) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  if (!counted) {
    for (int64_t m = 0; m < pool; ++m) counts[m] = 0;
    for (int64_t i = 0; i < batch * top_k; ++i) ++counts[idx[i]];
  }
  for (int64_t m = 0; m < pool; ++m) {
    const int64_t rank = math::descending_rank(counts, pool, m);
    if (rank < top_k) idx[rank] = m;  // row 0 holds the winners ...
  }
  for (int64_t b = 1; b < batch; ++b) {
    for (int64_t k = 0; k < top_k; ++k) idx[b * top_k + k] = idx[k];  // ... copied to every row
  }
}

// One thread per (b, k, d): selected_key = prompt_norm[idx] (ids clamped into [0, M)).
template <typename acc_t>
__global__ void selected_kernel(const acc_t* __restrict__ kn, const int64_t* __restrict__ idx,
                                acc_t* __restrict__ selected, int64_t rows, int64_t pool, int64_t width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * width) return;
  const int64_t id = math::clamp_id(idx[i / width], pool);
  selected[i] = kn[id * width + i % width];
}

// Single thread: reduce_sim = Σ_b Σ_k similarity[b, idx[b, k]] / B in a fixed order.
template <typename acc_t>
__global__ void reduce_sim_kernel(const acc_t* __restrict__ sim, const int64_t* __restrict__ idx,
                                  acc_t* __restrict__ out, int64_t batch, int64_t pool, int64_t top_k) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  acc_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < top_k; ++k) {
      total += sim[b * pool + math::clamp_id(idx[b * top_k + k], pool)];
    }
  }
  *out = total / static_cast<acc_t>(batch);
}

// One thread per element of the prompt head (B, K*Lp, D): prompted[b, j*Lp + l] = prompt[idx[b, j], l].
template <typename out_t>
__global__ void gather_kernel(const out_t* __restrict__ prompt, const int64_t* __restrict__ idx,
                              out_t* __restrict__ out, int64_t batch, int64_t top_k, int64_t length, int64_t width,
                              int64_t seq, int64_t pool) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t head = top_k * length * width;
  if (i >= batch * head) return;
  const int64_t b = i / head, r = i % head, j = r / (length * width), within = r % (length * width);
  const int64_t id = math::clamp_id(idx[b * top_k + j], pool);
  out[b * seq * width + r] = prompt[id * length * width + within];
}

ForwardResult pool_forward_cuda(const at::Tensor& x_embed, const std::optional<at::Tensor>& cls_features,
                                const at::Tensor& prompt, const at::Tensor& keys,
                                const std::optional<at::Tensor>& prompt_mask, int64_t mode, int64_t top_k,
                                bool batchwise, const std::optional<at::Tensor>& frequency,
                                const std::optional<at::Tensor>& vote_counts) {
  const c10::cuda::CUDAGuard guard(x_embed.device());
  const ForwardArgs a = prepare_forward(x_embed, cls_features, prompt, keys, prompt_mask, mode, top_k, batchwise,
                                        frequency, vote_counts);
  ForwardOutputs o = allocate_forward(a);
  at::Tensor q = a.mode == kModeCls ? a.cls : at::empty({a.batch, a.width}, a.x.options().dtype(a.acc_type));
  const int64_t offset = a.top_k * a.length, seq = offset + a.tokens;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool choose = !a.mask.defined() && !a.votes.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "pool_forward_cuda", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.out_type, "pool_forward_cuda_out", [&] {
      using out_t = scalar_t;
      dispatch_acc(a.acc_type, [&](auto acc_tag) {
        using acc_t = decltype(acc_tag);
        int32_t* argmax = (a.mode == 1 || a.mode == 2) ? o.argmax.data_ptr<int32_t>() : nullptr;
        tokens_kernel<x_t, out_t, acc_t><<<blocks_for(a.batch * a.width), kThreads, 0, stream>>>(
            a.x.data_ptr<x_t>(), o.prompted.data_ptr<out_t>(), q.data_ptr<acc_t>(), argmax, a.batch, a.tokens,
            a.width, offset, a.mode);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        normalise_kernel<acc_t><<<blocks_for(a.pool), kThreads, 0, stream>>>(
            a.keys.data_ptr<acc_t>(), o.prompt_norm.data_ptr<acc_t>(), o.k_sumsq.data_ptr<acc_t>(), a.pool, a.width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        normalise_kernel<acc_t><<<blocks_for(a.batch), kThreads, 0, stream>>>(
            q.data_ptr<acc_t>(), o.x_norm.data_ptr<acc_t>(), o.q_sumsq.data_ptr<acc_t>(), a.batch, a.width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        score_kernel<acc_t><<<blocks_for(a.batch), kThreads, 0, stream>>>(
            o.x_norm.data_ptr<acc_t>(), o.prompt_norm.data_ptr<acc_t>(), o.similarity.data_ptr<acc_t>(),
            o.idx.data_ptr<int64_t>(), a.freq.defined() ? a.freq.data_ptr<acc_t>() : nullptr, a.batch, a.pool,
            a.width, a.top_k, choose, a.mask.defined());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (a.batchwise) {
          at::Tensor counts = a.votes.defined() ? a.votes.clone() : at::empty({a.pool}, a.x.options().dtype(at::kLong));
          vote_kernel<<<1, 1, 0, stream>>>(o.idx.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), a.batch, a.pool,
                                           a.top_k, a.votes.defined());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        selected_kernel<acc_t><<<blocks_for(a.batch * a.top_k * a.width), kThreads, 0, stream>>>(
            o.prompt_norm.data_ptr<acc_t>(), o.idx.data_ptr<int64_t>(), o.selected_key.data_ptr<acc_t>(),
            a.batch * a.top_k, a.pool, a.width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        reduce_sim_kernel<acc_t><<<1, 1, 0, stream>>>(o.similarity.data_ptr<acc_t>(), o.idx.data_ptr<int64_t>(),
                                                      o.reduce_sim.data_ptr<acc_t>(), a.batch, a.pool, a.top_k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      gather_kernel<out_t><<<blocks_for(a.batch * offset * a.width), kThreads, 0, stream>>>(
          a.prompt.data_ptr<out_t>(), o.idx.data_ptr<int64_t>(), o.prompted.data_ptr<out_t>(), a.batch, a.top_k,
          a.length, a.width, seq, a.pool);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return o.as_tuple();
}

// The local half of the global vote: queries, similarity rows, per-row top-K, counts (M,) int64.
at::Tensor pool_vote_counts_cuda(const at::Tensor& x_embed, const std::optional<at::Tensor>& cls_features,
                                 const at::Tensor& keys, const std::optional<at::Tensor>& frequency, int64_t mode,
                                 int64_t top_k) {
  const c10::cuda::CUDAGuard guard(x_embed.device());
  const ForwardArgs a = prepare_vote_counts(x_embed, cls_features, keys, frequency, mode, top_k);
  const auto acc = a.x.options().dtype(a.acc_type);
  at::Tensor q = a.mode == kModeCls ? a.cls : at::empty({a.batch, a.width}, acc);
  at::Tensor xn = at::empty({a.batch, a.width}, acc), qs = at::empty({a.batch}, acc);
  at::Tensor kn = at::empty({a.pool, a.width}, acc), ks = at::empty({a.pool}, acc);
  at::Tensor sim = at::empty({a.batch, a.pool}, acc);
  at::Tensor idx = at::empty({a.batch, a.top_k}, a.x.options().dtype(at::kLong));
  at::Tensor counts = at::empty({a.pool}, a.x.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "pool_vote_counts_cuda", [&] {
    using x_t = scalar_t;
    dispatch_acc(a.acc_type, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      if (a.mode != kModeCls) {
        int32_t* no_argmax = nullptr;
        tokens_kernel<x_t, x_t, acc_t><<<blocks_for(a.batch * a.width), kThreads, 0, stream>>>(
            a.x.data_ptr<x_t>(), static_cast<x_t*>(nullptr), q.data_ptr<acc_t>(), no_argmax, a.batch, a.tokens,
            a.width, 0, a.mode);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      normalise_kernel<acc_t><<<blocks_for(a.pool), kThreads, 0, stream>>>(
          a.keys.data_ptr<acc_t>(), kn.data_ptr<acc_t>(), ks.data_ptr<acc_t>(), a.pool, a.width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      normalise_kernel<acc_t><<<blocks_for(a.batch), kThreads, 0, stream>>>(
          q.data_ptr<acc_t>(), xn.data_ptr<acc_t>(), qs.data_ptr<acc_t>(), a.batch, a.width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      score_kernel<acc_t><<<blocks_for(a.batch), kThreads, 0, stream>>>(
          xn.data_ptr<acc_t>(), kn.data_ptr<acc_t>(), sim.data_ptr<acc_t>(), idx.data_ptr<int64_t>(),
          a.freq.defined() ? a.freq.data_ptr<acc_t>() : nullptr, a.batch, a.pool, a.width, a.top_k, true, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  count_kernel<<<1, 1, 0, stream>>>(idx.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), a.batch, a.pool, a.top_k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

// ----------------------------------------------------------------------------------------------
// Backward kernels
// ----------------------------------------------------------------------------------------------

// One thread per (b, d): gradient of x_embed_norm[b, d] before the l2n backward (CPU order).
template <typename acc_t>
__global__ void query_norm_grad_kernel(const acc_t* __restrict__ g_xn, const acc_t* __restrict__ g_sim,
                                       const acc_t* __restrict__ kn, const int64_t* __restrict__ idx,
                                       const acc_t* __restrict__ g_reduce, acc_t* __restrict__ g, int64_t batch,
                                       int64_t pool, int64_t width, int64_t top_k) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * width) return;
  const int64_t b = i / width, d = i % width;
  const acc_t coef = *g_reduce / static_cast<acc_t>(batch);
  acc_t v = g_xn[i];
  for (int64_t m = 0; m < pool; ++m) v += g_sim[b * pool + m] * kn[m * width + d];
  for (int64_t k = 0; k < top_k; ++k) {
    v += coef * kn[math::clamp_id(idx[b * top_k + k], pool) * width + d];
  }
  g[i] = v;
}

// One thread per (m, d): gradient of prompt_norm[m, d] before the l2n backward (CPU order).
template <typename acc_t>
__global__ void key_norm_grad_kernel(const acc_t* __restrict__ g_kn, const acc_t* __restrict__ g_sim,
                                     const acc_t* __restrict__ g_sel, const acc_t* __restrict__ xn,
                                     const int64_t* __restrict__ idx, const acc_t* __restrict__ g_reduce,
                                     acc_t* __restrict__ g, int64_t batch, int64_t pool, int64_t width,
                                     int64_t top_k) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pool * width) return;
  const int64_t m = i / width, d = i % width;
  const acc_t coef = *g_reduce / static_cast<acc_t>(batch);
  acc_t v = g_kn[i];
  for (int64_t b = 0; b < batch; ++b) v += g_sim[b * pool + m] * xn[b * width + d];
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < top_k; ++k) {
      if (math::clamp_id(idx[b * top_k + k], pool) == m) v += g_sel[(b * top_k + k) * width + d] + coef * xn[b * width + d];
    }
  }
  g[i] = v;
}

// One thread per row: <y, g> with the fixed-lane dot.
template <typename acc_t>
__global__ void row_dot_kernel(const acc_t* __restrict__ y, const acc_t* __restrict__ g, acc_t* __restrict__ dot,
                               int64_t rows, int64_t width) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) dot[r] = math::row_dot(y + r * width, g + r * width, width);
}

// One thread per element: the l2n backward, in place.
template <typename acc_t>
__global__ void l2n_grad_kernel(const acc_t* __restrict__ y, acc_t* __restrict__ g, const acc_t* __restrict__ dot,
                                const acc_t* __restrict__ sumsq, int64_t rows, int64_t width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * width) return;
  const int64_t r = i / width;
  g[i] = math::l2n_grad(g[i], y[i], dot[r], sumsq[r]);
}

// One thread per (b, d): grad x[b, :, d] = token slice of grad_prompted + the query gradient.
template <typename grad_t, typename x_t, typename acc_t>
__global__ void token_grad_kernel(const grad_t* __restrict__ g, const acc_t* __restrict__ grad_q,
                                  const int32_t* __restrict__ argmax, x_t* __restrict__ grad_x, int64_t batch,
                                  int64_t tokens, int64_t width, int64_t offset, int64_t mode) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * width) return;
  const int64_t b = i / width, d = i % width, seq = offset + tokens;
  const grad_t* src = g + (b * seq + offset) * width + d;
  x_t* dst = grad_x + b * tokens * width + d;
  if (mode == kModeCls) {
    for (int64_t n = 0; n < tokens; ++n) dst[n * width] = cast_to<x_t>(src[n * width]);
    return;
  }
  const acc_t gq = grad_q[i];
  const acc_t mean_part = math::mean_grad(mode, gq, tokens);
  const int64_t arg = argmax != nullptr ? argmax[i] : -1;
  for (int64_t n = 0; n < tokens; ++n) {
    const acc_t hit = n == arg ? gq : acc_t(0);
    dst[n * width] = cast_to<x_t>(cast_to<acc_t>(src[n * width]) + mean_part + hit);
  }
}

// One thread per (m, l, d): Σ over (b, j) with idx[b, j] == m, in increasing (b, j) order.
template <typename grad_t, typename prompt_t, typename sum_t>
__global__ void prompt_grad_kernel(const grad_t* __restrict__ g, const int64_t* __restrict__ idx,
                                   prompt_t* __restrict__ grad_prompt, int64_t pairs, int64_t pool, int64_t top_k,
                                   int64_t length, int64_t width, int64_t seq) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pool * length * width) return;
  const int64_t m = i / (length * width), within = i % (length * width);
  sum_t acc = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    if (math::clamp_id(idx[p], pool) != m) continue;
    const int64_t b = p / top_k, j = p % top_k;
    acc += cast_to<sum_t>(g[b * seq * width + j * length * width + within]);
  }
  grad_prompt[i] = cast_to<prompt_t>(acc);
}

BackwardResult pool_backward_cuda(const at::Tensor& grad_prompted, const std::optional<at::Tensor>& grad_x_norm,
                                  const std::optional<at::Tensor>& grad_prompt_norm,
                                  const std::optional<at::Tensor>& grad_similarity,
                                  const std::optional<at::Tensor>& grad_selected_key, const at::Tensor& grad_reduce_sim,
                                  const at::Tensor& x_norm, const at::Tensor& prompt_norm, const at::Tensor& q_sumsq,
                                  const at::Tensor& k_sumsq, const at::Tensor& idx, const at::Tensor& argmax,
                                  int64_t mode, int64_t length, at::ScalarType x_dtype, at::ScalarType query_dtype,
                                  at::ScalarType prompt_dtype, at::ScalarType keys_dtype, bool need_x,
                                  bool need_query, bool need_prompt, bool need_keys) {
  const c10::cuda::CUDAGuard guard(grad_prompted.device());
  BackwardArgs a = prepare_backward(grad_prompted, grad_x_norm, grad_prompt_norm, grad_similarity, grad_selected_key,
                                    grad_reduce_sim, x_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax, mode, length);
  zero_missing_grads(a);  // the CUDA kernels read every gradient
  const auto opts = grad_prompted.options();
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_x = at::empty({0}, opts.dtype(x_dtype));
  at::Tensor grad_query = at::empty({0}, opts.dtype(query_dtype));
  at::Tensor grad_prompt = at::empty({0}, opts.dtype(prompt_dtype));
  at::Tensor grad_keys = at::empty({0}, opts.dtype(keys_dtype));
  const int64_t offset = a.top_k * a.length, seq = offset + a.tokens;
  const bool query_used = (need_x && mode != kModeCls) || (need_query && mode == kModeCls);
  at::Tensor grad_q;
  if (query_used || need_keys) {
    const auto acc_opts = opts.dtype(a.acc_type);
    grad_q = at::empty({a.batch, a.width}, acc_opts);
    at::Tensor grad_k = at::empty({a.pool, a.width}, acc_opts);
    at::Tensor q_dot = at::empty({a.batch}, acc_opts), k_dot = at::empty({a.pool}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES(a.acc_type, "pool_backward_cuda_small", [&] {
      using acc_t = scalar_t;
      const acc_t* g_reduce = a.grad_reduce_sim.data_ptr<acc_t>();
      query_norm_grad_kernel<acc_t><<<blocks_for(a.batch * a.width), kThreads, 0, stream>>>(
          a.grad_x_norm.data_ptr<acc_t>(), a.grad_similarity.data_ptr<acc_t>(), a.prompt_norm.data_ptr<acc_t>(),
          a.idx.data_ptr<int64_t>(), g_reduce, grad_q.data_ptr<acc_t>(), a.batch, a.pool, a.width, a.top_k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      row_dot_kernel<acc_t><<<blocks_for(a.batch), kThreads, 0, stream>>>(
          a.x_norm.data_ptr<acc_t>(), grad_q.data_ptr<acc_t>(), q_dot.data_ptr<acc_t>(), a.batch, a.width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      l2n_grad_kernel<acc_t><<<blocks_for(a.batch * a.width), kThreads, 0, stream>>>(
          a.x_norm.data_ptr<acc_t>(), grad_q.data_ptr<acc_t>(), q_dot.data_ptr<acc_t>(), a.q_sumsq.data_ptr<acc_t>(),
          a.batch, a.width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_keys) {
        key_norm_grad_kernel<acc_t><<<blocks_for(a.pool * a.width), kThreads, 0, stream>>>(
            a.grad_prompt_norm.data_ptr<acc_t>(), a.grad_similarity.data_ptr<acc_t>(),
            a.grad_selected_key.data_ptr<acc_t>(), a.x_norm.data_ptr<acc_t>(), a.idx.data_ptr<int64_t>(), g_reduce,
            grad_k.data_ptr<acc_t>(), a.batch, a.pool, a.width, a.top_k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        row_dot_kernel<acc_t><<<blocks_for(a.pool), kThreads, 0, stream>>>(
            a.prompt_norm.data_ptr<acc_t>(), grad_k.data_ptr<acc_t>(), k_dot.data_ptr<acc_t>(), a.pool, a.width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        l2n_grad_kernel<acc_t><<<blocks_for(a.pool * a.width), kThreads, 0, stream>>>(
            a.prompt_norm.data_ptr<acc_t>(), grad_k.data_ptr<acc_t>(), k_dot.data_ptr<acc_t>(),
            a.k_sumsq.data_ptr<acc_t>(), a.pool, a.width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    if (need_keys) grad_keys = grad_k.to(keys_dtype);
    if (need_query && mode == kModeCls) grad_query = grad_q.to(query_dtype);
  }
  if (need_x) {
    grad_x = at::empty({a.batch, a.tokens, a.width}, opts.dtype(x_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.grad_prompted.scalar_type(), "pool_bwd_x_cuda", [&] {
      using grad_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "pool_bwd_x2_cuda", [&] {
        using x_t = scalar_t;
        dispatch_acc(a.acc_type, [&](auto acc_tag) {
          using acc_t = decltype(acc_tag);
          const int32_t* arg = (mode == 1 || mode == 2) ? a.argmax.data_ptr<int32_t>() : nullptr;
          token_grad_kernel<grad_t, x_t, acc_t><<<blocks_for(a.batch * a.width), kThreads, 0, stream>>>(
              a.grad_prompted.data_ptr<grad_t>(), mode == kModeCls ? nullptr : grad_q.data_ptr<acc_t>(), arg,
              grad_x.data_ptr<x_t>(), a.batch, a.tokens, a.width, offset, mode);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  if (need_prompt) {
    grad_prompt = at::empty({a.pool, a.length, a.width}, opts.dtype(prompt_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.grad_prompted.scalar_type(), "pool_bwd_p_cuda", [&] {
      using grad_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prompt_dtype, "pool_bwd_p2_cuda", [&] {
        using prompt_t = scalar_t;
        using sum_t = std::conditional_t<std::is_same_v<grad_t, double> || std::is_same_v<prompt_t, double>, double,
                                         float>;
        prompt_grad_kernel<grad_t, prompt_t, sum_t><<<blocks_for(a.pool * a.length * a.width), kThreads, 0, stream>>>(
            a.grad_prompted.data_ptr<grad_t>(), a.idx.data_ptr<int64_t>(), grad_prompt.data_ptr<prompt_t>(),
            a.batch * a.top_k, a.pool, a.top_k, a.length, a.width, seq);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {grad_x, grad_query, grad_prompt, grad_keys};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p_fast, CUDA, m) {
  m.impl("pool_forward", &pool_forward_cuda);
  m.impl("pool_vote_counts", &pool_vote_counts_cuda);
  m.impl("pool_backward", &pool_backward_cuda);
}

}  // namespace l2p_fast
