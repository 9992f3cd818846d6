// CUDA one-pass sequence assembly (same contract as csrc/cpu/assemble.cpp):
//   out[b, s] = source row of s (CLS, prompt[idx[b, j], l] or x[b, n]) (+ pos[0, s]), written once.
// One block per output row (b, s), threads over D. Strided inputs are read as they are. Ids outside
// [0, M) are clamped into it (math::clamp_id), as in every backend: a kernel cannot raise.
// assemble_prompt_grad: one thread per (m, l, d) sums the selected gradient rows in (b, j) order
// (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <type_traits>

#include "common/pool_math.h"

namespace l2p_fast {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct AssembleShape {
  int64_t seq, width, pool, length, prompt_len;
  int64_t xs0, xs1, xs2, ps0, ps1, ps2, is0, is1, cs0, cs2, qs1, qs2;
};

template <typename scalar_t>
__global__ void assemble_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ prompt,
                                const int64_t* __restrict__ idx, const scalar_t* __restrict__ cls,
                                const scalar_t* __restrict__ pos, scalar_t* __restrict__ out, AssembleShape sh) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t r = blockIdx.x;  // output row: b * seq + s
  const int64_t b = r / sh.seq, s = r % sh.seq;
  const scalar_t* src = nullptr;
  int64_t step = 0;
  if (s == 0) {
    src = cls + b * sh.cs0;
    step = sh.cs2;
  } else if (s <= sh.prompt_len) {
    const int64_t j = (s - 1) / sh.length, l = (s - 1) % sh.length;
    const int64_t id = math::clamp_id(idx[b * sh.is0 + j * sh.is1], sh.pool);
    src = prompt + id * sh.ps0 + l * sh.ps1;
    step = sh.ps2;
  } else {
    src = x + b * sh.xs0 + (s - 1 - sh.prompt_len) * sh.xs1;
    step = sh.xs2;
  }
  scalar_t* dst = out + r * sh.width;
  for (int64_t d = threadIdx.x; d < sh.width; d += blockDim.x) {
    const scalar_t v = src != nullptr ? src[d * step] : scalar_t(0);
    if (pos != nullptr) {
      dst[d] = static_cast<scalar_t>(static_cast<acc_t>(v) + static_cast<acc_t>(pos[s * sh.qs1 + d * sh.qs2]));
    } else {
      dst[d] = v;
    }
  }
}

template <typename scalar_t>
__global__ void prompt_grad_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ idx,
                                   scalar_t* __restrict__ out, int64_t batch, int64_t top_k, int64_t width,
                                   int64_t pool, int64_t length, int64_t gs0, int64_t gs1, int64_t gs2,
                                   int64_t is0, int64_t is1) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pool * length * width) return;
  const int64_t d = i % width, r = i / width;
  const int64_t m = r / length, l = r % length;
  acc_t acc = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < top_k; ++j) {
      if (math::clamp_id(idx[b * is0 + j * is1], pool) == m) acc += static_cast<acc_t>(grad[b * gs0 + (1 + j * length + l) * gs1 + d * gs2]);
    }
  }
  out[i] = static_cast<scalar_t>(acc);
}

at::Tensor assemble_cuda(const at::Tensor& x_in, const at::Tensor& prompt_in, const at::Tensor& idx,
                         const at::Tensor& cls_in, const c10::optional<at::Tensor>& pos_in) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(0) >= 1, "assemble: x must be (B, N, D) with B >= 1, got ", x_in.sizes());
  TORCH_CHECK(prompt_in.dim() == 3 && prompt_in.size(2) == x_in.size(2) && prompt_in.size(0) >= 1 &&
                  prompt_in.size(1) >= 1,
              "assemble: prompt must be (M, Lp, D), got ", prompt_in.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == x_in.size(0) && idx.size(1) >= 1,
              "assemble: idx must be int64 (B, K), got ", idx.sizes());
  TORCH_CHECK(cls_in.dim() == 3 && (cls_in.size(0) == 1 || cls_in.size(0) == x_in.size(0)) && cls_in.size(1) == 1 &&
                  cls_in.size(2) == x_in.size(2),
              "assemble: cls must be (1 or B, 1, D), got ", cls_in.sizes());
  const int64_t prompt_len = idx.size(1) * prompt_in.size(1);
  const int64_t seq = 1 + prompt_len + x_in.size(1);
  if (pos_in.has_value()) {
    TORCH_CHECK(pos_in->dim() == 3 && pos_in->size(0) == 1 && pos_in->size(1) == seq && pos_in->size(2) == x_in.size(2),
                "assemble: pos must be (1, 1 + K*Lp + N, D), got ", pos_in->sizes());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto dtype = at::promote_types(at::promote_types(x_in.scalar_type(), prompt_in.scalar_type()), cls_in.scalar_type());
  if (pos_in.has_value()) dtype = at::promote_types(dtype, pos_in->scalar_type());
  const at::Tensor x = x_in.to(dtype), prompt = prompt_in.to(dtype), cls = cls_in.to(dtype);
  const at::Tensor pos = pos_in.has_value() ? pos_in->to(dtype) : at::Tensor();
  at::Tensor out = at::empty({x.size(0), seq, x.size(2)}, x.options().dtype(dtype));
  if (out.numel() == 0) return out;
  AssembleShape sh{seq, x.size(2), prompt.size(0), prompt.size(1), prompt_len,
                   x.stride(0), x.stride(1), x.stride(2), prompt.stride(0), prompt.stride(1), prompt.stride(2),
                   idx.stride(0), idx.stride(1), cls.size(0) == 1 ? 0 : cls.stride(0), cls.stride(2),
                   pos.defined() ? pos.stride(1) : 0, pos.defined() ? pos.stride(2) : 0};
  const int threads = static_cast<int>(std::min<int64_t>(256, ((x.size(2) + 31) / 32) * 32));
  const auto blocks = static_cast<unsigned int>(x.size(0) * seq);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "assemble_cuda", [&] {
    assemble_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), prompt.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), cls.data_ptr<scalar_t>(),
        pos.defined() ? pos.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), sh);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor assemble_prompt_grad_cuda(const at::Tensor& grad, const at::Tensor& idx, int64_t pool, int64_t length) {
  TORCH_CHECK(pool >= 1 && length >= 1, "assemble_prompt_grad: pool_size and length must be >= 1");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == grad.size(0),
              "assemble_prompt_grad: idx must be int64 (B, K), got ", idx.sizes());
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) >= 1 + idx.size(1) * length,
              "assemble_prompt_grad: grad must be (B, 1 + K*Lp + N, D), got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty({pool, length, grad.size(2)}, grad.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int threads = 256;
  const auto blocks = static_cast<unsigned int>((total + threads - 1) / threads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "assemble_prompt_grad_cuda", [&] {
    prompt_grad_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), grad.size(0), idx.size(1),
        grad.size(2), pool, length, grad.stride(0), grad.stride(1), grad.stride(2), idx.stride(0), idx.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2p_fast, CUDA, m) {
  m.impl("assemble", &assemble_cuda);
  m.impl("assemble_prompt_grad", &assemble_prompt_grad_cuda);
}

}  // namespace l2p_fast
