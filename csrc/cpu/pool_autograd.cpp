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
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "common/pool_host.h"

namespace l2p_fast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

ForwardResult call_pool_forward(const at::Tensor& x, const std::optional<at::Tensor>& cls, const at::Tensor& prompt,
                                const at::Tensor& keys, const std::optional<at::Tensor>& mask, int64_t mode,
                                int64_t top_k, bool batchwise, const std::optional<at::Tensor>& frequency,
                                const std::optional<at::Tensor>& vote_counts) {
  using OptTensor = std::optional<at::Tensor>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("l2p_fast::pool_forward", "")
                       .typed<ForwardResult(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                            const OptTensor&, int64_t, int64_t, bool, const OptTensor&,
                                            const OptTensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // straight to the CPU / CUDA kernel
  return op.call(x, cls, prompt, keys, mask, mode, top_k, batchwise, frequency, vote_counts);
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
// allocates, with the symbolic sizes as they are (no batch size specialised under dynamic shapes).
at::Tensor unused_grad(c10::SymIntArrayRef sym_sizes, const at::TensorOptions& options, const at::Tensor& like) {
  constexpr int64_t kMaxShared = int64_t{1} << 20;  // elements; larger ones are allocated as usual
  const auto keys = like.key_set();
  const bool plain = like.device().is_cpu() && !keys.has(c10::DispatchKey::Python) &&
                     !keys.has(c10::DispatchKey::Functionalize) && !c10::impl::TorchDispatchModeTLS::any_modes_set();
  if (!plain || options.device().type() != c10::DeviceType::CPU) return at::zeros_symint(sym_sizes, options);
  const c10::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(sym_sizes);  // plain eager: concrete sizes
  const int64_t numel = c10::multiply_integers(sizes);
  if (numel > kMaxShared) return at::zeros(sizes, options);
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

// The backward node of pool_forward, written directly on torch::autograd::Node (not through
// torch::autograd::Function, whose per-call machinery — a string-keyed IValue map for every saved scalar,
// output-info records of all ten outputs, a demangled type name on every backward — costs more than this
// node's whole bookkeeping). Edges (next functions): 0 x_embed, 1 cls_features, 2 prompt, 3 keys. Inputs
// (gradients of the differentiable outputs, undefined when unused): 0 prompted, 1 x_norm, 2 prompt_norm,
// 3 similarity, 4 selected_key, 5 reduce_sim. idx, argmax, q_sumsq and k_sumsq are not differentiable.
struct PoolForwardBackward final : public torch::autograd::Node {
  std::string name() const override { return "l2p_fast::PoolForwardBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&x_norm, &prompt_norm, &q_sumsq, &k_sumsq, &idx, &argmax}) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const c10::intrusive_ptr<Node> self = getptr();
    // x_norm and prompt_norm are outputs of this node (unpacked against it); the others have no history
    const variable_list saved = {x_norm.unpack(self), prompt_norm.unpack(self), q_sumsq.unpack(), k_sumsq.unpack(),
                                 idx.unpack(), argmax.unpack()};
    const auto acc = saved[0].options();
    // An input that no used output reaches gets no gradient (undefined: None), as in the reference: prompt
    // only through prompted; keys through prompt_norm, similarity, selected_key and reduce_sim; the query
    // through x_norm, similarity and reduce_sim; x_embed through prompted and, unless cls_features is the
    // query, through the query.
    const auto reached = [&grads](std::initializer_list<int> outputs) {
      return std::any_of(outputs.begin(), outputs.end(), [&grads](int i) { return grads[i].defined(); });
    };
    const bool reached_query = reached({1, 3, 5});
    const bool need_x = task_should_compute_output(0) && (grads[0].defined() || (mode != kModeCls && reached_query));
    const bool need_cls = task_should_compute_output(1) && reached_query;
    const bool need_prompt = task_should_compute_output(2) && grads[0].defined();
    const bool need_keys = task_should_compute_output(3) && reached({2, 3, 4, 5});
    if (!need_x && !need_cls && !need_prompt && !need_keys) return variable_list(4);
    // grads of (prompted, x_norm, prompt_norm, similarity, selected_key, reduce_sim); zeros where unused
    variable_list g = grads;
    if (!g[0].defined()) g[0] = unused_grad(prompted_sizes, acc.dtype(prompted_dtype), saved[0]);
    if (!g[5].defined()) g[5] = at::zeros({}, acc);  // g[1..4] stay undefined: zero, skipped by the op
    // with cls_features as the query, grad x_embed is the token slice of grad prompted: a view (no copy),
    // except for a leaf x_embed, whose grad the op writes contiguous (into a reused block, with streaming
    // stores when large)
    const bool x_as_view = need_x && mode == kModeCls && !x_leaf;
    auto [grad_x, grad_cls, grad_prompt, grad_keys] =
        call_pool_backward(g, saved, mode, length, x_dtype, query_dtype, prompt_dtype, keys_dtype,
                           need_x && !x_as_view, need_cls, need_prompt, need_keys);
    if (x_as_view) grad_x = g[0].slice_symint(1, saved[4].sym_size(1) * length).to(x_dtype);
    const at::Tensor none;
    return once_differentiable(saved, grads,
                               {need_x ? grad_x : none, need_cls ? grad_cls : none, need_prompt ? grad_prompt : none,
                                need_keys ? grad_keys : none});
  }

  SavedVariable x_norm, prompt_norm, q_sumsq, k_sumsq, idx, argmax;
  int64_t mode = 0, length = 0;
  std::vector<c10::SymInt> prompted_sizes;  // symbolic under dynamic-shape tracing
  at::ScalarType x_dtype{}, query_dtype{}, prompt_dtype{}, keys_dtype{}, prompted_dtype{};
  bool x_leaf = false;  // a leaf x_embed stores its grad: AccumulateGrad would clone a strided view
};

constexpr const char* kNoForwardAD =
    "l2p_fast: the native prompt pool (backend='cpu' / 'cuda') has no forward-mode AD (jvp); an input carries a "
    "forward gradient (torch.autograd.forward_ad). Use FusedPromptPool(backend='reference') for forward-mode AD.";

ForwardResult pool_forward_autograd(const at::Tensor& x, const std::optional<at::Tensor>& cls,
                                    const at::Tensor& prompt, const at::Tensor& keys,
                                    const std::optional<at::Tensor>& mask, int64_t mode, int64_t top_k,
                                    bool batchwise, const std::optional<at::Tensor>& frequency,
                                    const std::optional<at::Tensor>& vote_counts) {
  // frequency and vote_counts only change which ids are picked: no gradient flows to them
  const at::Tensor cls_or_none = cls.has_value() ? *cls : at::Tensor();
  TORCH_CHECK(!torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(cls_or_none) &&
                  !torch::autograd::isFwGradDefined(prompt) && !torch::autograd::isFwGradDefined(keys),
              kNoForwardAD);
  ForwardResult out = call_pool_forward(x, cls, prompt, keys, mask, mode, top_k, batchwise, frequency, vote_counts);
  if (!torch::autograd::compute_requires_grad(x, cls_or_none, prompt, keys)) return out;
  auto& [prompted, x_norm, prompt_norm, sim, idx, selected, reduce, argmax, q_sumsq, k_sumsq] = out;
  auto node = c10::make_intrusive<PoolForwardBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, cls_or_none, prompt, keys));
  torch::autograd::set_history({prompted, x_norm, prompt_norm, sim, selected, reduce}, node);
  node->x_norm = SavedVariable(x_norm, /*is_output=*/true);
  node->prompt_norm = SavedVariable(prompt_norm, /*is_output=*/true);
  node->q_sumsq = SavedVariable(q_sumsq, /*is_output=*/false);  // no history: saved as is
  node->k_sumsq = SavedVariable(k_sumsq, false);
  node->idx = SavedVariable(idx, false);
  node->argmax = SavedVariable(argmax, false);
  node->mode = mode;
  node->length = prompt.size(1);
  node->prompted_sizes = prompted.sym_sizes().vec();
  node->x_dtype = x.scalar_type();
  node->query_dtype = mode == kModeCls ? cls_or_none.scalar_type() : x.scalar_type();
  node->prompt_dtype = prompt.scalar_type();
  node->keys_dtype = keys.scalar_type();
  node->prompted_dtype = prompted.scalar_type();
  node->x_leaf = x.is_leaf();
  torch::autograd::fire_node_creation_hooks(node);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p_fast, Autograd, m) { m.impl("pool_forward", &pool_forward_autograd); }

}  // namespace l2p_fast
