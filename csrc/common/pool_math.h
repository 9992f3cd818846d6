// Per-row arithmetic of the fused prompt pool, shared by the CPU kernels (csrc/cpu/pool.cpp) and the
// CUDA kernels (csrc/cuda/pool.cu): the CPU tests exercise the same code the GPU runs.
// Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define L2P_HD __host__ __device__ __forceinline__
#else
#define L2P_HD inline
#endif

namespace l2p_fast::math {

// l2n(v) = v * rsqrt(max(|v|^2, eps)): the clamp is on the squared norm (docs/behaviour.md §4.2).
constexpr double kSquaredNormEps = 1e-12;
// Partial sums of row_dot: a fixed number of lanes combined in a fixed order, so the result does
// not depend on the thread count or the device, and the CPU loop vectorises.
constexpr int kDotLanes = 16;

template <typename T>
L2P_HD T correctly_rounded_sqrt(T x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Convert between float types (c10::Half / c10::BFloat16 go through float).
template <typename To, typename From>
L2P_HD To cast_to(From v) {
  if constexpr (sizeof(From) < 4 || sizeof(To) < 4) {
    return static_cast<To>(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

// Whether the squared norm was clamped (then the normalisation is a plain scaling).
template <typename acc_t>
L2P_HD bool is_clamped(acc_t sumsq) {
  return sumsq < static_cast<acc_t>(kSquaredNormEps);
}

// rsqrt(max(sumsq, eps)) as 1 / sqrt (both correctly rounded on host and device).
template <typename acc_t>
L2P_HD acc_t inverse_norm(acc_t sumsq) {
  const acc_t clamped = is_clamped(sumsq) ? static_cast<acc_t>(kSquaredNormEps) : sumsq;
  return acc_t(1) / correctly_rounded_sqrt(clamped);
}

// <a, b> over n elements with kDotLanes partial sums combined pairwise in a fixed order.
template <typename acc_t>
L2P_HD acc_t row_dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t part[kDotLanes];
  for (int l = 0; l < kDotLanes; ++l) part[l] = acc_t(0);
  int64_t d = 0;
  for (; d + kDotLanes <= n; d += kDotLanes) {
    for (int l = 0; l < kDotLanes; ++l) part[l] += a[d + l] * b[d + l];
  }
  // the tail: lane l takes element d + l. Constant lane indices (no running lane counter) keep part[] in
  // registers on the GPU: with a dynamic index nvcc put the fp64 array on the stack (128 bytes of local memory).
  for (int l = 0; l < kDotLanes; ++l) {
    if (d + l < n) part[l] += a[d + l] * b[d + l];
  }
  for (int width = kDotLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) part[l] += part[l + width];
  }
  return part[0];
}

// Strict total order of "ranks before" for a descending sort with the tie rule of docs/behaviour.md §4.3:
// larger value first, equal values -> lower id first; NaN counts as the largest value (as in
// torch.sort(descending=True)).
template <typename T>
L2P_HD bool ranks_before(T a, int64_t id_a, T b, int64_t id_b) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || id_a < id_b);
  return a > b || (a == b && id_a < id_b);
}

// Diversified selection (docs/behaviour.md §8, the L2P paper's equation 4): the penalised score of a prompt of
// similarity s chosen with normalised frequency h in earlier tasks, -max(1 - s, 0) * h (the cosine distance
// weighted by h, negated so that larger ranks first). NaN stays NaN (a NaN similarity still ranks first).
template <typename T>
L2P_HD T penalised_score(T s, T h) {
  T distance = T(1) - s;
  distance = distance < T(0) ? T(0) : distance;  // not fmax: a NaN distance must stay NaN
  return -(distance * h);
}

// "Ranks before" of the diversified selection: penalised score first (descending, NaN first, NaNs by id),
// then the similarity with the plain rule (so h = 0 everywhere is the plain selection), then the id.
template <typename T>
L2P_HD bool ranks_before_penalised(T s_a, T h_a, int64_t id_a, T s_b, T h_b, int64_t id_b) {
  const T p_a = penalised_score(s_a, h_a), p_b = penalised_score(s_b, h_b);
  if (p_a != p_a || p_b != p_b || p_a == p_b) {
    return (p_a != p_a || p_b != p_b) ? ranks_before(p_a, id_a, p_b, id_b) : ranks_before(s_a, id_a, s_b, id_b);
  }
  return p_a > p_b;
}

// Whether v replaces the running maximum `best` of torch.max: NaN wins over every number and the first
// NaN stays; otherwise only a strictly greater value replaces it (the first maximum wins).
template <typename T>
L2P_HD bool replaces_max(T v, T best) {
  return v > best || (v != v && best == best);
}

// A prompt id clamped into [0, pool): where the Python value check is skipped (under torch.compile) an
// out-of-range id selects the nearest valid prompt, as in every backend, and no kernel reads out of bounds.
L2P_HD int64_t clamp_id(int64_t id, int64_t pool) { return id < 0 ? 0 : (id >= pool ? pool - 1 : id); }

// Position of entry i in the descending order of values[0..count) (a permutation of 0..count-1).
template <typename T>
L2P_HD int64_t descending_rank(const T* values, int64_t count, int64_t i) {
  int64_t rank = 0;
  const T v = values[i];
  for (int64_t j = 0; j < count; ++j) {
    rank += (j != i && ranks_before(values[j], j, v, i)) ? 1 : 0;
  }
  return rank;
}

// Position of prompt i in the selection order of a similarity row (count entries): the plain rule
// (descending_rank) when freq is null, else the diversified rule with frequencies freq[0..count).
template <typename T>
L2P_HD int64_t selection_rank(const T* row, const T* freq, int64_t count, int64_t i) {
  if (freq == nullptr) return descending_rank(row, count, i);
  int64_t rank = 0;
  for (int64_t j = 0; j < count; ++j) {
    rank += (j != i && ranks_before_penalised(row[j], freq[j], j, row[i], freq[i], i)) ? 1 : 0;
  }
  return rank;
}

// Gradient of l2n at one element: y = l2n(v) (the saved output), g = dL/dy, dot = <y, g> of the row.
// Unclamped: r * (g - y * dot); clamped: r * g (the clamp passes no gradient to the norm).
// l2n_grad_row applies it with r = inverse_norm(sumsq) and the clamp flag computed once per row
// (the same numbers, without a square root and a division per element).
template <typename acc_t>
L2P_HD acc_t l2n_grad_row(acc_t g, acc_t y, acc_t dot, acc_t r, bool clamped) {
  return clamped ? r * g : r * (g - y * dot);
}

template <typename acc_t>
L2P_HD acc_t l2n_grad(acc_t g, acc_t y, acc_t dot, acc_t sumsq) {
  return l2n_grad_row(g, y, dot, inverse_norm(sumsq), is_clamped(sumsq));
}

// Query of one feature from its running token statistics (docs/behaviour.md §4.1).
// mode 0: mean, 1: max, 2: max + 2 * mean.
template <typename acc_t>
L2P_HD acc_t finish_query(int64_t mode, acc_t sum, acc_t best, int64_t tokens) {
  const acc_t mean = sum / static_cast<acc_t>(tokens);
  return mode == 0 ? mean : (mode == 1 ? best : best + acc_t(2) * mean);
}

// The mean part of the query gradient per token: g / N (mode 0), 2g / N (mode 2), 0 (mode 1), computed
// as the reference's autograd does.
template <typename acc_t>
L2P_HD acc_t mean_grad(int64_t mode, acc_t g, int64_t tokens) {
  return mode == 1 ? acc_t(0) : (mode == 2 ? acc_t(2) * g : g) / static_cast<acc_t>(tokens);
}

}  // namespace l2p_fast::math
