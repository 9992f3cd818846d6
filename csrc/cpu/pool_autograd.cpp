// Autograd of l2p_fast::pool_forward in C++, one kernel for CPU and CUDA tensors (the Autograd
// dispatch key), so that no Python runs on the training path. The backward calls
// l2p_fast::pool_backward through the dispatcher (its fake makes it traceable by torch.compile).
// With cls_features as the query, grad x_embed is the token slice of grad prompted: a view, or for a
// leaf x_embed (whose grad autograd would clone into fresh memory) a contiguous copy the op writes into a
// block of the output cache.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "common/pool_host.h"

namespace l2p_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

ForwardResult call_pool_forward(const at::Tensor& x, const std::optional<at::Tensor>& cls, const at::Tensor& prompt,
                                const at::Tensor& keys, const std::optional<at::Tensor>& mask, int64_t mode,
                                int64_t top_k, bool batchwise) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("l2p_fast::pool_forward", "")
                       .typed<ForwardResult(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                            const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                                            bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // straight to the CPU / CUDA kernel
  return op.call(x, cls, prompt, keys, mask, mode, top_k, batchwise);
}

// g: the gradients of (prompted, x_norm, prompt_norm, similarity, selected_key, reduce_sim); an
// undefined one among x_norm ... selected_key goes to the op as None (zero, its terms skipped).
BackwardResult call_pool_backward(const variable_list& g, const variable_list& saved, int64_t mode, int64_t length,
                                  at::ScalarType x_dtype, at::ScalarType query_dtype, at::ScalarType prompt_dtype,
                                  at::ScalarType keys_dtype, bool need_x, bool need_query, bool need_prompt,
                                  bool need_keys) {
  using OptTensor = std::optional<at::Tensor>;
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("l2p_fast::pool_backward", "")
          .typed<BackwardResult(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t, at::ScalarType, at::ScalarType, at::ScalarType, at::ScalarType, bool, bool,
                                bool, bool)>();
  const auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
  // straight to the CPU / CUDA kernel, unboxed: pool_backward has no autograd of its own, and through the
  // Autograd key it would take PyTorch's boxed not-implemented fallback (the 22 arguments boxed and unboxed)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(g[0], opt(g[1]), opt(g[2]), opt(g[3]), opt(g[4]), g[5], saved[0], saved[1], saved[2], saved[3],
                 saved[4], saved[5], mode, length, x_dtype, query_dtype, prompt_dtype, keys_dtype, need_x, need_query,
                 need_prompt, need_keys);
}

// Zeros standing in for the gradient of an unused prompted_embedding: small CPU ones are views of one
// zero buffer per dtype (pool_backward only reads them), so a backward allocates and clears nothing
// for them. Only for plain eager tensors: under tracing (fake / functional tensors, Python modes) it
// allocates.
at::Tensor unused_grad(at::IntArrayRef sizes, const at::TensorOptions& options, const at::Tensor& like) {
  constexpr int64_t kMaxShared = int64_t{1} << 20;  // elements; larger ones are allocated as usual
  const int64_t numel = c10::multiply_integers(sizes);
  const auto keys = like.key_set();
  const bool plain = like.device().is_cpu() && !keys.has(c10::DispatchKey::Python) &&
                     !keys.has(c10::DispatchKey::Functionalize) && !c10::impl::TorchDispatchModeTLS::any_modes_set();
  if (!plain || options.device().type() != c10::DeviceType::CPU || numel > kMaxShared) {
    return at::zeros(sizes, options);
  }
  static std::mutex mutex;
  static auto* buffers = new std::map<at::ScalarType, at::Tensor>();  // never destroyed (tensors may outlive it)
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[dtype];
  if (!buffer.defined() || buffer.numel() < numel) buffer = at::zeros({std::max(numel, int64_t{1} << 16)}, options);
  return buffer.narrow(0, 0, numel).view(sizes);
}

constexpr const char* kNoDoubleBackward =
    "l2p_fast: the native prompt pool (backend='cpu' / 'cuda') is differentiable once: its backward has no "
    "backward of its own, so a second-order gradient through it (create_graph=True, then differentiating the "
    "gradients again) is not available. Use FusedPromptPool(backend='reference') for higher-order gradients.";

// Under create_graph=True the backward's results get an Error node as their history (the C++ counterpart
// of Python's @once_differentiable): first-order use of them works, differentiating them again raises
// kNoDoubleBackward instead of silently missing this node's second-order terms. The Error node's edges
// lead to the saved x_norm and prompt_norm (outputs of this node) and to the incoming gradients.
variable_list once_differentiable(const variable_list& saved, const variable_list& grads, variable_list results) {
  if (!at::GradMode::is_enabled()) return results;  // a plain backward: nothing to record
  variable_list history = {saved[0], saved[1]};
  for (const auto& grad : grads) {
    if (grad.defined()) history.push_back(grad);
  }
  torch::autograd::tensor_list data;
  data.reserve(results.size());
  for (const auto& t : results) data.push_back(t.defined() ? t.detach() : at::Tensor());
  return torch::autograd::wrap_outputs(history, std::move(data), [](torch::autograd::edge_list&& edges) {
    return c10::make_intrusive<torch::autograd::Error>(kNoDoubleBackward, std::move(edges));
  });
}

class PoolForwardFunction : public torch::autograd::Function<PoolForwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& cls,
                               const at::Tensor& prompt, const at::Tensor& keys,
                               const std::optional<at::Tensor>& mask, int64_t mode, int64_t top_k, bool batchwise) {
    auto [prompted, x_norm, prompt_norm, sim, idx, selected, reduce, argmax, q_sumsq, k_sumsq] =
        call_pool_forward(x, cls, prompt, keys, mask, mode, top_k, batchwise);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({idx, argmax, q_sumsq, k_sumsq});
    ctx->save_for_backward({x_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax});
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["length"] = prompt.size(1);
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    const bool has_cls = cls.has_value() && cls->defined();
    ctx->saved_data["has_cls"] = has_cls;
    // a leaf x_embed stores its grad: AccumulateGrad would clone a strided view with a fresh malloc,
    // so such a grad is written contiguous into a reused block instead (same bytes, no page faults)
    ctx->saved_data["x_leaf"] = x.is_leaf();
    ctx->saved_data["query_dtype"] = static_cast<int64_t>(has_cls ? cls->scalar_type() : x.scalar_type());
    ctx->saved_data["prompt_dtype"] = static_cast<int64_t>(prompt.scalar_type());
    ctx->saved_data["keys_dtype"] = static_cast<int64_t>(keys.scalar_type());
    ctx->saved_data["prompted_sizes"] = prompted.sizes().vec();
    ctx->saved_data["prompted_dtype"] = static_cast<int64_t>(prompted.scalar_type());
    return {prompted, x_norm, prompt_norm, sim, idx, selected, reduce, argmax, q_sumsq, k_sumsq};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x_norm = saved[0];
    const at::Tensor& idx = saved[4];
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const int64_t length = ctx->saved_data["length"].toInt();
    const auto dtype = [&](const char* key) { return static_cast<at::ScalarType>(ctx->saved_data[key].toInt()); };
    const int64_t top_k = idx.size(1);
    const auto acc = x_norm.options();
    // grads of (prompted, x_norm, prompt_norm, similarity, selected_key, reduce_sim); zeros where unused
    variable_list g = {grads[0], grads[1], grads[2], grads[3], grads[5], grads[6]};
    if (!g[0].defined()) {
      const auto sizes = ctx->saved_data["prompted_sizes"].toIntVector();
      g[0] = unused_grad(sizes, acc.dtype(dtype("prompted_dtype")), x_norm);
    }
    if (!g[5].defined()) g[5] = at::zeros({}, acc);  // g[1..4] stay undefined: zero, skipped by the op
    // needs_input_grad counts tensor inputs only: x, [cls_features], prompt, keys, [prompt_mask]
    const bool has_cls = ctx->saved_data["has_cls"].toBool();
    const size_t prompt_edge = has_cls ? 2 : 1;
    const bool need_x = ctx->needs_input_grad(0), need_cls = has_cls && ctx->needs_input_grad(1);
    const bool need_prompt = ctx->needs_input_grad(prompt_edge), need_keys = ctx->needs_input_grad(prompt_edge + 1);
    // with cls_features as the query, grad x_embed is the token slice of grad prompted: a view (no copy),
    // except for a leaf x_embed, whose grad the op writes contiguous (into a reused block, with streaming
    // stores when large)
    const bool x_as_view = need_x && mode == kModeCls && !ctx->saved_data["x_leaf"].toBool();
    auto [grad_x, grad_cls, grad_prompt, grad_keys] =
        call_pool_backward(g, saved, mode, length, dtype("x_dtype"), dtype("query_dtype"), dtype("prompt_dtype"),
                           dtype("keys_dtype"), need_x && !x_as_view, need_cls, need_prompt, need_keys);
    if (x_as_view) grad_x = g[0].slice(1, top_k * length).to(dtype("x_dtype"));
    const at::Tensor none;
    variable_list results = once_differentiable(
        saved, grads,
        {need_x ? grad_x : none, need_cls ? grad_cls : none, need_prompt ? grad_prompt : none,
         need_keys ? grad_keys : none});
    results.resize(8);  // no gradient for the mask and the int arguments
    return results;
  }
};

ForwardResult pool_forward_autograd(const at::Tensor& x, const std::optional<at::Tensor>& cls,
                                    const at::Tensor& prompt, const at::Tensor& keys,
                                    const std::optional<at::Tensor>& mask, int64_t mode, int64_t top_k,
                                    bool batchwise) {
  const variable_list out = PoolForwardFunction::apply(x, cls, prompt, keys, mask, mode, top_k, batchwise);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9]};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p_fast, Autograd, m) { m.impl("pool_forward", &pool_forward_autograd); }

}  // namespace l2p_fast
