// Host-side argument checks and output allocation of the fused prompt-pool ops, shared by the CPU
// (csrc/cpu/pool.cpp) and CUDA (csrc/cuda/pool.cu) implementations.
// Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length, T = K * Lp + N.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/output_cache.h"

namespace l2p_fast {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Query modes of pool_forward: 0 mean, 1 max, 2 max + 2 * mean (over tokens), 3 cls_features.
constexpr int64_t kModeCls = 3;

struct ForwardArgs {
  at::Tensor x;       // (B, N, D) contiguous, input dtype
  at::Tensor cls;     // (B, D) contiguous in acc dtype (mode 3), else undefined
  at::Tensor prompt;  // (M, Lp, D) contiguous in the output dtype
  at::Tensor keys;    // (M, D) contiguous in acc dtype
  at::Tensor mask;    // (B, K) int64 contiguous, or undefined
  at::Tensor freq;    // (M,) acc dtype contiguous: selection frequencies (diversified selection), or undefined
  at::Tensor votes;   // (M,) int64 contiguous: vote counts given (the global vote), or undefined
  int64_t batch, tokens, width, pool, length, top_k, mode;
  bool batchwise;
  at::ScalarType acc_type, out_type;
};

struct ForwardOutputs {
  at::Tensor prompted;      // (B, T, D) out dtype
  at::Tensor x_norm;        // (B, D) acc
  at::Tensor prompt_norm;   // (M, D) acc
  at::Tensor similarity;    // (B, M) acc
  at::Tensor idx;           // (B, K) int64
  at::Tensor selected_key;  // (B, K, D) acc
  at::Tensor reduce_sim;    // () acc
  at::Tensor argmax;        // (B, D) int32 for modes 1, 2; (0,) otherwise
  at::Tensor q_sumsq;       // (B,) acc: squared norm of each query
  at::Tensor k_sumsq;       // (M,) acc: squared norm of each key
  ForwardResult as_tuple() const {
    return {prompted, x_norm, prompt_norm, similarity, idx, selected_key, reduce_sim, argmax, q_sumsq, k_sumsq};
  }
};

// frequency (M,) float and vote_counts (M,) integer: checked and converted into a (acc dtype, int64).
inline void prepare_selection_inputs(ForwardArgs& a, const std::optional<at::Tensor>& frequency,
                                     const std::optional<at::Tensor>& vote_counts, const at::Device& device) {
  if (frequency.has_value()) {
    TORCH_CHECK(frequency->is_floating_point() && frequency->dim() == 1 && frequency->size(0) == a.pool &&
                    frequency->device() == device,
                "pool_forward: frequency must be a float (M,) = (", a.pool, ",) tensor on ", device, ", got ",
                frequency->scalar_type(), " of shape ", frequency->sizes(), " on ", frequency->device());
    a.freq = frequency->to(a.acc_type).contiguous();
  }
  if (vote_counts.has_value()) {
    TORCH_CHECK(!vote_counts->is_floating_point() && !vote_counts->is_complex() &&
                    vote_counts->scalar_type() != at::kBool && vote_counts->dim() == 1 &&
                    vote_counts->size(0) == a.pool && vote_counts->device() == device,
                "pool_forward: vote_counts must be an integer (M,) = (", a.pool, ",) tensor on ", device, ", got ",
                vote_counts->scalar_type(), " of shape ", vote_counts->sizes(), " on ", vote_counts->device());
    a.votes = vote_counts->to(at::kLong).contiguous();
  }
}

inline ForwardArgs prepare_forward(const at::Tensor& x, const std::optional<at::Tensor>& cls,
                                   const at::Tensor& prompt, const at::Tensor& keys,
                                   const std::optional<at::Tensor>& mask, int64_t mode, int64_t top_k,
                                   bool batchwise, const std::optional<at::Tensor>& frequency = std::nullopt,
                                   const std::optional<at::Tensor>& vote_counts = std::nullopt) {
  TORCH_CHECK(x.dim() == 3 && x.is_floating_point(), "pool_forward: x_embed must be a float (B, N, D) tensor, got ",
              x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(1) >= 1, "pool_forward: x_embed needs B >= 1 and N >= 1, got ", x.sizes());
  const int64_t batch = x.size(0), width = x.size(2);
  TORCH_CHECK(prompt.dim() == 3 && prompt.is_floating_point() && prompt.size(2) == width && prompt.size(0) >= 1,
              "pool_forward: prompt must be a float (M, Lp, D) tensor with D = ", width, ", got ",
              prompt.scalar_type(), " of shape ", prompt.sizes());
  const int64_t pool = prompt.size(0);
  TORCH_CHECK(keys.dim() == 2 && keys.is_floating_point() && keys.size(0) == pool && keys.size(1) == width,
              "pool_forward: keys must be a float (M, D) = (", pool, ", ", width, ") tensor, got ", keys.scalar_type(),
              " of shape ", keys.sizes());
  TORCH_CHECK(mode >= 0 && mode <= kModeCls, "pool_forward: mode must be in [0, 3], got ", mode);
  TORCH_CHECK((mode == kModeCls) == cls.has_value(), "pool_forward: cls_features must be given exactly when mode == 3");
  TORCH_CHECK(prompt.device() == x.device() && keys.device() == x.device(),
              "pool_forward: x_embed, prompt and keys must be on one device, got ", x.device(), ", ", prompt.device(),
              ", ", keys.device());
  ForwardArgs args;
  args.acc_type = at::promote_types(at::promote_types(x.scalar_type(), keys.scalar_type()), at::kFloat);
  args.out_type = at::promote_types(prompt.scalar_type(), x.scalar_type());
  if (cls.has_value()) {
    TORCH_CHECK(cls->is_floating_point() && cls->dim() == 2 && cls->size(0) == batch && cls->size(1) == width &&
                    cls->device() == x.device(),
                "pool_forward: cls_features must be a float (B, D) = (", batch, ", ", width, ") tensor on ", x.device(),
                ", got ", cls->scalar_type(), " of shape ", cls->sizes(), " on ", cls->device());
    args.cls = cls->to(args.acc_type).contiguous();
  }
  if (mask.has_value()) {
    TORCH_CHECK(!mask->is_floating_point() && !mask->is_complex() && mask->scalar_type() != at::kBool &&
                    mask->dim() == 2 && mask->size(0) == batch && mask->size(1) >= 1 && mask->device() == x.device(),
                "pool_forward: prompt_mask must be an integer (B, K') tensor with B = ", batch, " on ", x.device(),
                ", got ", mask->scalar_type(), " of shape ", mask->sizes(), " on ", mask->device());
    args.mask = mask->to(at::kLong).contiguous();
    args.top_k = mask->size(1);
  } else {
    TORCH_CHECK(top_k >= 1 && top_k <= pool, "pool_forward: top_k must be in [1, M = ", pool, "], got ", top_k);
    args.top_k = top_k;
  }
  args.x = x.contiguous();
  args.prompt = prompt.to(args.out_type).contiguous();
  args.keys = keys.to(args.acc_type).contiguous();
  args.batch = batch;
  args.tokens = x.size(1);
  args.width = width;
  args.pool = pool;
  args.length = prompt.size(1);
  args.mode = mode;
  args.batchwise = batchwise && !mask.has_value();
  prepare_selection_inputs(args, frequency, vote_counts, x.device());
  if (!args.batchwise) args.votes = at::Tensor();  // counts pick the vote's winners only
  return args;
}

// pool_vote_counts: the query, keys and selection inputs of pool_forward, without prompts (Lp = 0).
inline ForwardArgs prepare_vote_counts(const at::Tensor& x, const std::optional<at::Tensor>& cls,
                                       const at::Tensor& keys, const std::optional<at::Tensor>& frequency,
                                       int64_t mode, int64_t top_k) {
  TORCH_CHECK(x.dim() == 3 && x.is_floating_point() && x.size(0) >= 1 && x.size(1) >= 1,
              "pool_vote_counts: x_embed must be a float (B, N, D) tensor with B, N >= 1, got ", x.scalar_type(),
              " of shape ", x.sizes());
  const int64_t batch = x.size(0), width = x.size(2);
  TORCH_CHECK(keys.dim() == 2 && keys.is_floating_point() && keys.size(0) >= 1 && keys.size(1) == width &&
                  keys.device() == x.device(),
              "pool_vote_counts: keys must be a float (M, D) tensor with D = ", width, " on ", x.device(), ", got ",
              keys.scalar_type(), " of shape ", keys.sizes(), " on ", keys.device());
  TORCH_CHECK(mode >= 0 && mode <= kModeCls, "pool_vote_counts: mode must be in [0, 3], got ", mode);
  TORCH_CHECK((mode == kModeCls) == cls.has_value(),
              "pool_vote_counts: cls_features must be given exactly when mode == 3");
  ForwardArgs args;
  args.pool = keys.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= args.pool, "pool_vote_counts: top_k must be in [1, M = ", args.pool, "], got ",
              top_k);
  args.acc_type = at::promote_types(at::promote_types(x.scalar_type(), keys.scalar_type()), at::kFloat);
  args.out_type = x.scalar_type();
  if (cls.has_value()) {
    TORCH_CHECK(cls->is_floating_point() && cls->dim() == 2 && cls->size(0) == batch && cls->size(1) == width &&
                    cls->device() == x.device(),
                "pool_vote_counts: cls_features must be a float (B, D) = (", batch, ", ", width, ") tensor on ",
                x.device(), ", got ", cls->scalar_type(), " of shape ", cls->sizes());
    args.cls = cls->to(args.acc_type).contiguous();
  }
  args.x = x.contiguous();
  args.keys = keys.to(args.acc_type).contiguous();
  args.batch = batch;
  args.tokens = x.size(1);
  args.width = width;
  args.length = 0;
  args.top_k = top_k;
  args.mode = mode;
  args.batchwise = true;
  prepare_selection_inputs(args, frequency, std::nullopt, x.device());
  return args;
}

inline ForwardOutputs allocate_forward(const ForwardArgs& a) {
  const auto acc = a.x.options().dtype(a.acc_type);
  ForwardOutputs o;
  o.prompted = empty_output({a.batch, a.top_k * a.length + a.tokens, a.width}, a.x.options().dtype(a.out_type));
  o.x_norm = new_empty({a.batch, a.width}, acc);
  o.prompt_norm = new_empty({a.pool, a.width}, acc);
  o.similarity = new_empty({a.batch, a.pool}, acc);
  o.idx = a.mask.defined() ? a.mask.clone() : new_empty({a.batch, a.top_k}, a.x.options().dtype(at::kLong));
  o.selected_key = new_empty({a.batch, a.top_k, a.width}, acc);
  o.reduce_sim = new_empty({}, acc);
  const bool with_argmax = a.mode == 1 || a.mode == 2;
  o.argmax = with_argmax ? new_empty({a.batch, a.width}, a.x.options().dtype(at::kInt))
                         : new_empty({0}, a.x.options().dtype(at::kInt));
  o.q_sumsq = new_empty({a.batch}, acc);
  o.k_sumsq = new_empty({a.pool}, acc);
  return o;
}

struct BackwardArgs {
  // grad_x_norm, grad_prompt_norm, grad_similarity, grad_selected_key: undefined when zero
  at::Tensor grad_prompted, grad_x_norm, grad_prompt_norm, grad_similarity, grad_selected_key, grad_reduce_sim;
  at::Tensor x_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax;
  int64_t batch, tokens, width, pool, length, top_k, mode;
  at::ScalarType acc_type;
};

inline BackwardArgs prepare_backward(const at::Tensor& grad_prompted, const std::optional<at::Tensor>& grad_x_norm,
                                     const std::optional<at::Tensor>& grad_prompt_norm,
                                     const std::optional<at::Tensor>& grad_similarity,
                                     const std::optional<at::Tensor>& grad_selected_key, const at::Tensor& grad_reduce_sim,
                                     const at::Tensor& x_norm, const at::Tensor& prompt_norm,
                                     const at::Tensor& q_sumsq, const at::Tensor& k_sumsq, const at::Tensor& idx,
                                     const at::Tensor& argmax, int64_t mode, int64_t length) {
  TORCH_CHECK(x_norm.dim() == 2 && prompt_norm.dim() == 2 && idx.dim() == 2 && grad_prompted.dim() == 3,
              "pool_backward: expected x_embed_norm (B, D), prompt_norm (M, D), idx (B, K), grad_prompted (B, T, D)");
  BackwardArgs a;
  a.batch = x_norm.size(0);
  a.width = x_norm.size(1);
  a.pool = prompt_norm.size(0);
  a.top_k = idx.size(1);
  a.length = length;
  a.mode = mode;
  a.acc_type = x_norm.scalar_type();
  a.tokens = grad_prompted.size(1) - a.top_k * length;
  TORCH_CHECK(mode >= 0 && mode <= kModeCls, "pool_backward: mode must be in [0, 3], got ", mode);
  TORCH_CHECK(length >= 1 && a.tokens >= 1 && grad_prompted.size(0) == a.batch && grad_prompted.size(2) == a.width,
              "pool_backward: grad_prompted must be (B, K * Lp + N, D) with B = ", a.batch, ", K * Lp = ",
              a.top_k * length, ", D = ", a.width, ", got ", grad_prompted.sizes());
  TORCH_CHECK(prompt_norm.size(1) == a.width && idx.size(0) == a.batch && idx.scalar_type() == at::kLong,
              "pool_backward: prompt_norm (M, D) / idx (B, K) int64 do not match x_embed_norm (B, D)");
  const auto shape_ok = [](const std::optional<at::Tensor>& g, at::IntArrayRef sizes) {
    return !g.has_value() || g->sizes() == sizes;
  };
  TORCH_CHECK(shape_ok(grad_x_norm, x_norm.sizes()) && shape_ok(grad_prompt_norm, prompt_norm.sizes()) &&
                  shape_ok(grad_similarity, {a.batch, a.pool}) &&
                  shape_ok(grad_selected_key, {a.batch, a.top_k, a.width}) && grad_reduce_sim.numel() == 1,
              "pool_backward: gradient shapes do not match the forward outputs");
  TORCH_CHECK(q_sumsq.numel() == a.batch && k_sumsq.numel() == a.pool, "pool_backward: bad saved squared norms");
  const bool with_argmax = mode == 1 || mode == 2;
  TORCH_CHECK(!with_argmax || (argmax.scalar_type() == at::kInt && argmax.sizes() == x_norm.sizes()),
              "pool_backward: argmax must be (B, D) int32 for modes 1 and 2");
  const auto acc = [&](const at::Tensor& t) { return t.to(a.acc_type).contiguous(); };
  const auto acc_or_none = [&](const std::optional<at::Tensor>& t) { return t.has_value() ? acc(*t) : at::Tensor(); };
  a.grad_prompted = grad_prompted.contiguous();
  a.grad_x_norm = acc_or_none(grad_x_norm);  // undefined: zero
  a.grad_prompt_norm = acc_or_none(grad_prompt_norm);
  a.grad_similarity = acc_or_none(grad_similarity);
  a.grad_selected_key = acc_or_none(grad_selected_key);
  a.grad_reduce_sim = acc(grad_reduce_sim).reshape({});
  a.x_norm = x_norm.contiguous();
  a.prompt_norm = prompt_norm.contiguous();
  a.q_sumsq = acc(q_sumsq);
  a.k_sumsq = acc(k_sumsq);
  a.idx = idx.contiguous();
  a.argmax = argmax.contiguous();
  return a;
}

// Zeros in place of the missing (zero) small gradients, for kernels that read all of them.
inline void zero_missing_grads(BackwardArgs& a) {
  const auto acc = a.x_norm.options();
  if (!a.grad_x_norm.defined()) a.grad_x_norm = at::zeros({a.batch, a.width}, acc);
  if (!a.grad_prompt_norm.defined()) a.grad_prompt_norm = at::zeros({a.pool, a.width}, acc);
  if (!a.grad_similarity.defined()) a.grad_similarity = at::zeros({a.batch, a.pool}, acc);
  if (!a.grad_selected_key.defined()) a.grad_selected_key = at::zeros({a.batch, a.top_k, a.width}, acc);
}

// Calls f(double{}) or f(float{}): the accumulation type of the similarity stage.
template <typename F>
void dispatch_acc(at::ScalarType acc_type, F&& f) {
  if (acc_type == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

}  // namespace l2p_fast
