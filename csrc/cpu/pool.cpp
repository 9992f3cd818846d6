// CPU fused prompt pool (docs/behaviour.md §4). Forward with a token query (mean / max / mean_max): the token slice
// of each output row is copied once while the query is reduced in the same pass; then normalise +
// score + top-K (tie rule) + batch vote + pull term; then the selected prompts fill the head of each
// row. With cls_features as the query, selection comes first and each row is written front to back in
// one pass. Every output element is written once.
// Backward: deterministic per-prompt reduction of grad prompt (fixed (row, slot) order, no scatter
// temporary), grad of the token slice (+ query gradient), grads of keys and query through the pull
// term. Per-row arithmetic comes from common/pool_math.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/pool_host.h"
#include "common/pool_math.h"
#include "cpu/stream_copy.h"

namespace l2p_fast {
namespace {

using math::cast_to;

// dst[0:n] = src[0:n] cast to dst_t; same-type rows with streaming stores when `streaming` (outputs
// larger than the cache, cpu/stream_copy.h).
template <typename src_t, typename dst_t>
inline void copy_row(const src_t* src, dst_t* dst, int64_t n, bool streaming = false) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    copy_bytes(dst, src, static_cast<size_t>(n) * sizeof(src_t), streaming);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = cast_to<dst_t>(src[i]);
  }
}

// Rows per task so that a task touches at least ~256K elements: small problems run inline, without
// waking the thread pool (measured on the 2-core machine: a parallel region costs ~25 us, as much as
// ~250K multiply-adds; the similarity and gradient loops of an L2P batch are smaller than that).
inline int64_t grain_for(int64_t elements_per_row) {
  constexpr int64_t kMinElementsPerTask = 1 << 18;
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, elements_per_row));
}

// ----------------------------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------------------------

// One token row (D,) into the running reductions (sum for modes 0 and 2, first maximum and its token for
// modes 1 and 2), with kCopy also into its output row (same dtype, regular stores: one pass, each element
// loaded once). Restrict-qualified, one loop per mode, so the compiler vectorises it across d (the sum of
// each d still runs in token order).
template <bool kCopy, bool kSum, bool kMax, typename x_t, typename acc_t>
inline void reduce_token(const x_t* __restrict token, x_t* __restrict copy, acc_t* __restrict sum,
                         acc_t* __restrict best, int32_t* __restrict arg, int32_t n, int64_t width) {
  for (int64_t d = 0; d < width; ++d) {
    const x_t raw = token[d];
    if constexpr (kCopy) copy[d] = raw;
    const acc_t v = cast_to<acc_t>(raw);
    if constexpr (kSum) sum[d] += v;
    if constexpr (kMax) {
      const bool greater = math::replaces_max(v, best[d]);  // as torch.max: NaN wins, then the first maximum
      best[d] = greater ? v : best[d];
      arg[d] = greater ? n : arg[d];
    }
  }
}

template <bool kCopy, typename x_t, typename acc_t>
inline void reduce_token_in_mode(int64_t mode, const x_t* token, x_t* copy, acc_t* sum, acc_t* best, int32_t* arg,
                                 int32_t n, int64_t width) {
  if (mode == 0) {
    reduce_token<kCopy, true, false>(token, copy, sum, best, arg, n, width);
  } else if (mode == 1) {
    reduce_token<kCopy, false, true>(token, copy, sum, best, arg, n, width);
  } else {
    reduce_token<kCopy, true, true>(token, copy, sum, best, arg, n, width);
  }
}

// Copies x[b] into prompted[b, K*Lp:] and reduces the query of row b from the same reads (modes 0-2).
template <typename x_t, typename out_t, typename acc_t>
void copy_tokens_and_reduce(const ForwardArgs& a, ForwardOutputs& o, acc_t* q) {
  const int64_t tokens = a.tokens, width = a.width, mode = a.mode;
  const int64_t seq = a.top_k * a.length + tokens, offset = a.top_k * a.length;
  const x_t* x = a.x.data_ptr<x_t>();
  out_t* out = o.prompted.data_ptr<out_t>();
  int32_t* argmax = (mode == 1 || mode == 2) ? o.argmax.data_ptr<int32_t>() : nullptr;
  const bool streaming = stream_output(o.prompted.nbytes());
  at::parallel_for(0, a.batch, grain_for(tokens * width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(width), best(width);
    std::vector<int32_t> arg(width);
    for (int64_t b = begin; b < end; ++b) {
      const x_t* src = x + b * tokens * width;
      out_t* dst = out + (b * seq + offset) * width;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(arg.begin(), arg.end(), 0);
      for (int64_t n = 0; n < tokens; ++n) {
        const x_t* token = src + n * width;
        out_t* row = dst + n * width;
        const int32_t n32 = static_cast<int32_t>(n);
        if constexpr (std::is_same_v<x_t, out_t>) {
          if (!streaming) {
            reduce_token_in_mode<true>(mode, token, row, sum.data(), best.data(), arg.data(), n32, width);
            continue;
          }
        }
        copy_row(token, row, width, streaming);
        reduce_token_in_mode<false>(mode, token, static_cast<x_t*>(nullptr), sum.data(), best.data(), arg.data(), n32,
                                    width);
      }
      for (int64_t d = 0; d < width; ++d) q[b * width + d] = math::finish_query(mode, sum[d], best[d], tokens);
      if (argmax != nullptr) std::memcpy(argmax + b * width, arg.data(), width * sizeof(int32_t));
    }
    if (streaming) stream_fence();
  });
}

// Normalise queries and keys, score, select (top-K, tie rule, vote), selected keys, pull term.
template <typename acc_t>
void score_and_select(const ForwardArgs& a, ForwardOutputs& o, const acc_t* q) {
  const int64_t batch = a.batch, width = a.width, pool = a.pool, top_k = a.top_k;
  const acc_t* keys = a.keys.data_ptr<acc_t>();
  acc_t* xn = o.x_norm.data_ptr<acc_t>();
  acc_t* kn = o.prompt_norm.data_ptr<acc_t>();
  acc_t* sim = o.similarity.data_ptr<acc_t>();
  acc_t* qs = o.q_sumsq.data_ptr<acc_t>();
  acc_t* ks = o.k_sumsq.data_ptr<acc_t>();
  int64_t* idx = o.idx.data_ptr<int64_t>();
  const auto normalise = [width](const acc_t* v, acc_t* out, acc_t* sumsq) {
    *sumsq = math::row_dot(v, v, width);
    const acc_t r = math::inverse_norm(*sumsq);
    for (int64_t d = 0; d < width; ++d) out[d] = v[d] * r;
  };
  at::parallel_for(0, pool, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) normalise(keys + m * width, kn + m * width, ks + m);
  });
  const bool choose = !a.mask.defined() && !a.votes.defined();  // given vote counts: no per-row top-K needed
  const acc_t* freq = a.freq.defined() ? a.freq.data_ptr<acc_t>() : nullptr;
  if (a.mask.defined()) {  // idx holds a copy of prompt_mask: out-of-range ids are clamped (math::clamp_id)
    for (int64_t i = 0; i < batch * top_k; ++i) idx[i] = math::clamp_id(idx[i], pool);
  }
  at::parallel_for(0, batch, grain_for(pool * width), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      normalise(q + b * width, xn + b * width, qs + b);
      acc_t* row = sim + b * pool;
      for (int64_t m = 0; m < pool; ++m) row[m] = math::row_dot(xn + b * width, kn + m * width, width);
      if (!choose) continue;
      for (int64_t m = 0; m < pool; ++m) {
        const int64_t rank = math::selection_rank(row, freq, pool, m);
        if (rank < top_k) idx[b * top_k + rank] = m;
      }
    }
  });
  if (a.batchwise) {
    std::vector<int64_t> counts(pool, 0), winners(top_k, 0);
    if (a.votes.defined()) {
      std::memcpy(counts.data(), a.votes.data_ptr<int64_t>(), pool * sizeof(int64_t));
    } else {
      for (int64_t i = 0; i < batch * top_k; ++i) ++counts[idx[i]];
    }
    for (int64_t m = 0; m < pool; ++m) {
      const int64_t rank = math::descending_rank(counts.data(), pool, m);
      if (rank < top_k) winners[rank] = m;
    }
    for (int64_t b = 0; b < batch; ++b) std::memcpy(idx + b * top_k, winners.data(), top_k * sizeof(int64_t));
  }
  acc_t* selected = o.selected_key.data_ptr<acc_t>();
  at::parallel_for(0, batch * top_k, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(selected + i * width, kn + idx[i] * width, width * sizeof(acc_t));
  });
  acc_t total = 0;  // serial, fixed order: independent of the thread count
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < top_k; ++k) total += sim[b * pool + idx[b * top_k + k]];
  }
  *o.reduce_sim.data_ptr<acc_t>() = total / static_cast<acc_t>(batch);
}

// prompted[b, j*Lp : (j+1)*Lp] = prompt[idx[b, j]] (prompt already in the output dtype).
template <typename out_t>
void gather_prompts(const ForwardArgs& a, ForwardOutputs& o) {
  const int64_t top_k = a.top_k, block = a.length * a.width;
  const int64_t seq = top_k * a.length + a.tokens;
  const out_t* prompt = a.prompt.data_ptr<out_t>();
  out_t* out = o.prompted.data_ptr<out_t>();
  const int64_t* idx = o.idx.data_ptr<int64_t>();
  const bool streaming = stream_output(o.prompted.nbytes());
  at::parallel_for(0, a.batch * top_k, grain_for(block), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / top_k, j = i % top_k;
      copy_row(prompt + idx[i] * block, out + b * seq * a.width + j * block, block, streaming);
    }
    if (streaming) stream_fence();
  });
}

// Query from cls_features (known before any token is read): select first, then write each output row
// front to back in one pass — the selected prompts, then the tokens.
template <typename x_t, typename out_t>
void write_rows(const ForwardArgs& a, ForwardOutputs& o) {
  const int64_t top_k = a.top_k, width = a.width, block = a.length * width, tokens = a.tokens;
  const int64_t seq = top_k * a.length + tokens;
  const x_t* x = a.x.data_ptr<x_t>();
  const out_t* prompt = a.prompt.data_ptr<out_t>();
  out_t* out = o.prompted.data_ptr<out_t>();
  const int64_t* idx = o.idx.data_ptr<int64_t>();
  const bool streaming = stream_output(o.prompted.nbytes());
  at::parallel_for(0, a.batch, grain_for(seq * width), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      out_t* row = out + b * seq * width;
      for (int64_t j = 0; j < top_k; ++j) {
        copy_row(prompt + idx[b * top_k + j] * block, row + j * block, block, streaming);
      }
      copy_row(x + b * tokens * width, row + top_k * block, tokens * width, streaming);
    }
    if (streaming) stream_fence();
  });
}

// The query of each row (modes 0-2) from its tokens, without copying them: the first half of the global vote.
template <typename x_t, typename acc_t>
void reduce_queries(const ForwardArgs& a, acc_t* q) {
  const int64_t tokens = a.tokens, width = a.width, mode = a.mode;
  const x_t* x = a.x.data_ptr<x_t>();
  at::parallel_for(0, a.batch, grain_for(tokens * width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(width), best(width);
    std::vector<int32_t> arg(width);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
      for (int64_t n = 0; n < tokens; ++n) {
        reduce_token_in_mode<false>(mode, x + (b * tokens + n) * width, static_cast<x_t*>(nullptr), sum.data(),
                                    best.data(), arg.data(), static_cast<int32_t>(n), width);
      }
      for (int64_t d = 0; d < width; ++d) q[b * width + d] = math::finish_query(mode, sum[d], best[d], tokens);
    }
  });
}

// counts[m] = the rows that hold prompt m among their (plain or diversified) top-K: the vote's local half.
template <typename acc_t>
void count_votes(const ForwardArgs& a, const acc_t* q, int64_t* counts) {
  const int64_t batch = a.batch, width = a.width, pool = a.pool, top_k = a.top_k;
  const acc_t* keys = a.keys.data_ptr<acc_t>();
  const acc_t* freq = a.freq.defined() ? a.freq.data_ptr<acc_t>() : nullptr;
  std::vector<acc_t> kn(pool * width), ks(pool);
  std::vector<int64_t> idx(batch * top_k);
  const auto normalise = [width](const acc_t* v, acc_t* out) {
    const acc_t r = math::inverse_norm(math::row_dot(v, v, width));
    for (int64_t d = 0; d < width; ++d) out[d] = v[d] * r;
  };
  for (int64_t m = 0; m < pool; ++m) normalise(keys + m * width, kn.data() + m * width);
  at::parallel_for(0, batch, grain_for(pool * width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xn(width), row(pool);
    for (int64_t b = begin; b < end; ++b) {
      normalise(q + b * width, xn.data());
      for (int64_t m = 0; m < pool; ++m) row[m] = math::row_dot(xn.data(), kn.data() + m * width, width);
      for (int64_t m = 0; m < pool; ++m) {
        const int64_t rank = math::selection_rank(row.data(), freq, pool, m);
        if (rank < top_k) idx[b * top_k + rank] = m;
      }
    }
  });
  std::fill_n(counts, pool, int64_t{0});
  for (int64_t i = 0; i < batch * top_k; ++i) ++counts[idx[i]];
}

at::Tensor pool_vote_counts_cpu(const at::Tensor& x_embed, const std::optional<at::Tensor>& cls_features,
                                const at::Tensor& keys, const std::optional<at::Tensor>& frequency, int64_t mode,
                                int64_t top_k) {
  const ForwardArgs a = prepare_vote_counts(x_embed, cls_features, keys, frequency, mode, top_k);
  at::Tensor counts = at::empty({a.pool}, a.x.options().dtype(at::kLong));
  at::Tensor q = a.mode == kModeCls ? a.cls : at::empty({a.batch, a.width}, a.x.options().dtype(a.acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "pool_vote_counts_cpu", [&] {
    using x_t = scalar_t;
    dispatch_acc(a.acc_type, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      if (a.mode != kModeCls) reduce_queries<x_t, acc_t>(a, q.data_ptr<acc_t>());
      count_votes<acc_t>(a, q.data_ptr<acc_t>(), counts.data_ptr<int64_t>());
    });
  });
  return counts;
}

ForwardResult pool_forward_cpu(const at::Tensor& x_embed, const std::optional<at::Tensor>& cls_features,
                               const at::Tensor& prompt, const at::Tensor& keys,
                               const std::optional<at::Tensor>& prompt_mask, int64_t mode, int64_t top_k,
                               bool batchwise, const std::optional<at::Tensor>& frequency,
                               const std::optional<at::Tensor>& vote_counts) {
  const ForwardArgs a = prepare_forward(x_embed, cls_features, prompt, keys, prompt_mask, mode, top_k, batchwise,
                                        frequency, vote_counts);
  ForwardOutputs o = allocate_forward(a);
  at::Tensor q = a.mode == kModeCls ? a.cls : new_empty({a.batch, a.width}, a.x.options().dtype(a.acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "pool_forward_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.out_type, "pool_forward_cpu_out", [&] {
      using out_t = scalar_t;
      dispatch_acc(a.acc_type, [&](auto acc_tag) {
        using acc_t = decltype(acc_tag);
        if (a.mode != kModeCls) copy_tokens_and_reduce<x_t, out_t, acc_t>(a, o, q.data_ptr<acc_t>());
        score_and_select<acc_t>(a, o, q.data_ptr<acc_t>());
      });
      if (a.mode == kModeCls) {
        write_rows<x_t, out_t>(a, o);
      } else {
        gather_prompts<out_t>(a, o);
      }
    });
  });
  return o.as_tuple();
}

// ----------------------------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------------------------

// out = the gradient of l2n at one row: g = dL/dy (D,), y = l2n(v) (D,) the saved output, sumsq = |v|^2.
// The inverse norm and the clamp flag are computed once for the row (math::l2n_grad_row).
template <typename acc_t>
void l2n_grad_into(const acc_t* g, const acc_t* y, acc_t sumsq, int64_t width, acc_t* out) {
  const acc_t dot = math::row_dot(y, g, width);
  const acc_t r = math::inverse_norm(sumsq);
  const bool clamped = math::is_clamped(sumsq);
  for (int64_t d = 0; d < width; ++d) out[d] = math::l2n_grad_row(g[d], y[d], dot, r, clamped);
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// grad of the query (B, D) and of the keys (M, D), both before the dtype casts, through
// x_embed_norm, prompt_norm, similarity, selected_key and reduce_sim (a missing gradient is zero and
// its term is skipped: in the L2P step only reduce_sim reaches the keys, B*K*D multiply-adds).
template <typename acc_t>
void query_and_key_grads(const BackwardArgs& a, acc_t* grad_q, acc_t* grad_k) {
  const int64_t batch = a.batch, width = a.width, pool = a.pool, top_k = a.top_k;
  const acc_t* xn = a.x_norm.data_ptr<acc_t>();
  const acc_t* kn = a.prompt_norm.data_ptr<acc_t>();
  const acc_t* g_xn = data_or_null<acc_t>(a.grad_x_norm);
  const acc_t* g_kn = data_or_null<acc_t>(a.grad_prompt_norm);
  const acc_t* g_sim = data_or_null<acc_t>(a.grad_similarity);
  const acc_t* g_sel = data_or_null<acc_t>(a.grad_selected_key);
  const acc_t* qs = a.q_sumsq.data_ptr<acc_t>();
  const acc_t* ks = a.k_sumsq.data_ptr<acc_t>();
  const int64_t* idx = a.idx.data_ptr<int64_t>();
  const acc_t coef = *a.grad_reduce_sim.data_ptr<acc_t>() / static_cast<acc_t>(batch);
  if (grad_q != nullptr) {  // null when neither x_embed nor cls_features needs a gradient
    const int64_t work = ((g_sim != nullptr ? pool : 0) + top_k + 2) * width;
    at::parallel_for(0, batch, grain_for(work), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> g(width);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t d = 0; d < width; ++d) g[d] = g_xn != nullptr ? g_xn[b * width + d] : acc_t(0);
        for (int64_t m = 0; g_sim != nullptr && m < pool; ++m) {
          const acc_t s = g_sim[b * pool + m];
          for (int64_t d = 0; d < width; ++d) g[d] += s * kn[m * width + d];
        }
        for (int64_t k = 0; k < top_k; ++k) {
          const acc_t* key = kn + math::clamp_id(idx[b * top_k + k], pool) * width;
          for (int64_t d = 0; d < width; ++d) g[d] += coef * key[d];
        }
        l2n_grad_into(g.data(), xn + b * width, qs[b], width, grad_q + b * width);
      }
    });
  }
  if (grad_k == nullptr) return;
  const int64_t work = (g_sim != nullptr ? batch : 0) * width + batch * top_k * (1 + 2 * width / pool) + 2 * width;
  at::parallel_for(0, pool, grain_for(work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(width);
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t d = 0; d < width; ++d) g[d] = g_kn != nullptr ? g_kn[m * width + d] : acc_t(0);
      for (int64_t b = 0; g_sim != nullptr && b < batch; ++b) {
        const acc_t s = g_sim[b * pool + m];
        for (int64_t d = 0; d < width; ++d) g[d] += s * xn[b * width + d];
      }
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t k = 0; k < top_k; ++k) {
          if (math::clamp_id(idx[b * top_k + k], pool) != m) continue;
          const acc_t* x_row = xn + b * width;
          const acc_t* sel = g_sel != nullptr ? g_sel + (b * top_k + k) * width : nullptr;
          for (int64_t d = 0; d < width; ++d) g[d] += (sel != nullptr ? sel[d] : acc_t(0)) + coef * x_row[d];
        }
      }
      l2n_grad_into(g.data(), kn + m * width, ks[m], width, grad_k + m * width);
    }
  });
}

// grad x (B, N, D) = token slice of grad_prompted + the query gradient through mean / max.
template <typename grad_t, typename x_t, typename acc_t>
void token_grads(const BackwardArgs& a, const acc_t* grad_q, x_t* grad_x) {
  const int64_t tokens = a.tokens, width = a.width, mode = a.mode;
  const int64_t offset = a.top_k * a.length, seq = offset + tokens;
  const grad_t* g = a.grad_prompted.data_ptr<grad_t>();
  const int32_t* argmax = (mode == 1 || mode == 2) ? a.argmax.data_ptr<int32_t>() : nullptr;
  const bool streaming = stream_output(a.batch * tokens * width * static_cast<int64_t>(sizeof(x_t)));
  at::parallel_for(0, a.batch, grain_for(tokens * width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean_part(width);
    for (int64_t b = begin; b < end; ++b) {
      const grad_t* src = g + (b * seq + offset) * width;
      x_t* dst = grad_x + b * tokens * width;
      if (mode == kModeCls) {
        copy_row(src, dst, tokens * width, streaming);
        continue;
      }
      const acc_t* gq = grad_q + b * width;
      for (int64_t d = 0; d < width; ++d) mean_part[d] = math::mean_grad(mode, gq[d], tokens);
      for (int64_t n = 0; n < tokens; ++n) {
        const grad_t* s = src + n * width;
        x_t* t = dst + n * width;
        if (argmax == nullptr) {
          for (int64_t d = 0; d < width; ++d) t[d] = cast_to<x_t>(cast_to<acc_t>(s[d]) + mean_part[d]);
        } else {
          const int32_t* arg = argmax + b * width;
          const int32_t n32 = static_cast<int32_t>(n);
          for (int64_t d = 0; d < width; ++d) {
            const acc_t hit = arg[d] == n32 ? gq[d] : acc_t(0);
            t[d] = cast_to<x_t>(cast_to<acc_t>(s[d]) + mean_part[d] + hit);
          }
        }
      }
    }
  });
}

// grad prompt[m, l] = Σ over the (row b, slot j) with idx[b, j] == m, in increasing (b, j) order,
// of grad_prompted[b, j*Lp + l]: deterministic, independent of the thread count. The threads share
// the rows of the chosen prompts only (with the batch vote: K of the M prompts), so that the work is
// balanced whichever prompts were chosen; each row sums whole D-wide rows into an L1-resident
// accumulator. Rows of prompts nobody chose are zero.
template <typename grad_t, typename prompt_t>
void prompt_grads(const BackwardArgs& a, prompt_t* grad_prompt) {
  using sum_t = std::conditional_t<std::is_same_v<grad_t, double> || std::is_same_v<prompt_t, double>, double, float>;
  const int64_t pool = a.pool, top_k = a.top_k, length = a.length, width = a.width;
  const int64_t seq = top_k * length + a.tokens, pairs = a.batch * top_k;
  const int64_t* idx = a.idx.data_ptr<int64_t>();
  std::vector<int64_t> start(pool + 1, 0), order(pairs);
  for (int64_t i = 0; i < pairs; ++i) ++start[math::clamp_id(idx[i], pool) + 1];
  std::vector<int64_t> chosen;  // prompt ids with at least one (row, slot), increasing
  for (int64_t m = 0; m < pool; ++m) {
    if (start[m + 1] > 0) {
      chosen.push_back(m);
    } else {
      std::fill_n(grad_prompt + m * length * width, length * width, cast_to<prompt_t>(sum_t(0)));
    }
  }
  for (int64_t m = 0; m < pool; ++m) start[m + 1] += start[m];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < pairs; ++i) order[fill[math::clamp_id(idx[i], pool)]++] = i;  // increasing (b, j) order
  const grad_t* g = a.grad_prompted.data_ptr<grad_t>();
  const int64_t rows = static_cast<int64_t>(chosen.size()) * length;
  const int64_t reads_per_row = pairs * width / std::max<int64_t>(1, static_cast<int64_t>(chosen.size()));
  at::parallel_for(0, rows, grain_for(reads_per_row), [&](int64_t begin, int64_t end) {
    std::vector<sum_t> acc(width);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t m = chosen[r / length], l = r % length;
      std::fill(acc.begin(), acc.end(), sum_t(0));
      for (int64_t p = start[m]; p < start[m + 1]; ++p) {
        const int64_t b = order[p] / top_k, j = order[p] % top_k;
        const grad_t* src = g + (b * seq + j * length + l) * width;
        for (int64_t d = 0; d < width; ++d) acc[d] += cast_to<sum_t>(src[d]);
      }
      prompt_t* dst = grad_prompt + (m * length + l) * width;
      for (int64_t d = 0; d < width; ++d) dst[d] = cast_to<prompt_t>(acc[d]);
    }
  });
}

BackwardResult pool_backward_cpu(const at::Tensor& grad_prompted, const std::optional<at::Tensor>& grad_x_norm,
                                 const std::optional<at::Tensor>& grad_prompt_norm,
                                 const std::optional<at::Tensor>& grad_similarity,
                                 const std::optional<at::Tensor>& grad_selected_key, const at::Tensor& grad_reduce_sim,
                                 const at::Tensor& x_norm, const at::Tensor& prompt_norm, const at::Tensor& q_sumsq,
                                 const at::Tensor& k_sumsq, const at::Tensor& idx, const at::Tensor& argmax,
                                 int64_t mode, int64_t length, at::ScalarType x_dtype, at::ScalarType query_dtype,
                                 at::ScalarType prompt_dtype, at::ScalarType keys_dtype, bool need_x, bool need_query,
                                 bool need_prompt, bool need_keys) {
  const BackwardArgs a = prepare_backward(grad_prompted, grad_x_norm, grad_prompt_norm, grad_similarity,
                                          grad_selected_key, grad_reduce_sim, x_norm, prompt_norm, q_sumsq, k_sumsq,
                                          idx, argmax, mode, length);
  const auto opts = grad_prompted.options();
  at::Tensor grad_x = new_empty({0}, opts.dtype(x_dtype));
  at::Tensor grad_query = new_empty({0}, opts.dtype(query_dtype));
  at::Tensor grad_prompt = new_empty({0}, opts.dtype(prompt_dtype));
  at::Tensor grad_keys = new_empty({0}, opts.dtype(keys_dtype));
  const bool query_used = (need_x && mode != kModeCls) || (need_query && mode == kModeCls);
  at::Tensor grad_q;
  if (query_used || need_keys) {
    if (query_used) grad_q = new_empty({a.batch, a.width}, opts.dtype(a.acc_type));
    at::Tensor grad_k = need_keys ? new_empty({a.pool, a.width}, opts.dtype(a.acc_type)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(a.acc_type, "pool_backward_cpu_small", [&] {
      query_and_key_grads<scalar_t>(a, query_used ? grad_q.data_ptr<scalar_t>() : nullptr,
                                    need_keys ? grad_k.data_ptr<scalar_t>() : nullptr);
    });
    if (need_keys) grad_keys = grad_k.to(keys_dtype);
    if (need_query && mode == kModeCls) grad_query = grad_q.to(query_dtype);
  }
  if (need_x) {
    grad_x = empty_output({a.batch, a.tokens, a.width}, opts.dtype(x_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.grad_prompted.scalar_type(), "pool_bwd_x", [&] {
      using grad_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "pool_bwd_x2", [&] {
        using x_t = scalar_t;
        dispatch_acc(a.acc_type, [&](auto acc_tag) {
          using acc_t = decltype(acc_tag);
          token_grads<grad_t, x_t, acc_t>(a, mode == kModeCls ? nullptr : grad_q.data_ptr<acc_t>(),
                                          grad_x.data_ptr<x_t>());
        });
      });
    });
  }
  if (need_prompt) {
    grad_prompt = new_empty({a.pool, a.length, a.width}, opts.dtype(prompt_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.grad_prompted.scalar_type(), "pool_bwd_p", [&] {
      using grad_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prompt_dtype, "pool_bwd_p2", [&] {
        prompt_grads<grad_t, scalar_t>(a, grad_prompt.data_ptr<scalar_t>());
      });
    });
  }
  return {grad_x, grad_query, grad_prompt, grad_keys};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p_fast, CPU, m) {
  m.impl("pool_forward", &pool_forward_cpu);
  m.impl("pool_vote_counts", &pool_vote_counts_cpu);
  m.impl("pool_backward", &pool_backward_cpu);
}

}  // namespace l2p_fast
