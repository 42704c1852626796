#pragma once
// Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_(params, max_norm) with norm_type 2:
// one L2 norm over every gradient of every parameter; when it exceeds max_norm all gradients are
// scaled by max_norm / (norm + 1e-6).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"

namespace moekit::train {

namespace detail {
// Sum of squares in double over fixed blocks, the partial sums added in block order: the result is
// the same whatever the thread count.
template <class T>
double sum_squares(const T* g, std::int64_t n) {
  constexpr std::int64_t kBlock = 1 << 14;
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> part(blocks, 0.0);
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (std::int64_t b = 0; b < blocks; ++b) {
    double s = 0.0;
    const std::int64_t end = std::min(n, (b + 1) * kBlock);
    for (std::int64_t i = b * kBlock; i < end; ++i) s += double(g[i]) * double(g[i]);
    part[b] = s;
  }
  double s = 0.0;
  for (double p : part) s += p;
  return s;
}
// Scales every gradient by max_norm / (norm + 1e-6) when that is below 1 (torch's clip_grad_norm_).
template <class T>
void scale_to(std::vector<Parameter<T>>& params, double max_norm, double norm) {
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return;
  for (auto& p : params) {
    const std::int64_t n = p.numel();
    T* g = p.grad;
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (std::int64_t i = 0; i < n; ++i) g[i] = T(double(g[i]) * coef);
  }
}
}  // namespace detail

// sqrt(sum over parameters and elements of grad^2). Throws NumericError naming the first parameter
// whose gradient is not finite.
template <class T>
double global_grad_norm(const std::vector<Parameter<T>>& params) {
  double total = 0.0;
  for (const auto& p : params) {
    const double s = detail::sum_squares(p.grad, p.numel());
    if (!std::isfinite(s)) throw NumericError("gradient of " + p.name + " is not finite");
    total += s;
  }
  return std::sqrt(total);
}

// Scales every gradient by min(1, max_norm / (norm + 1e-6)); returns the norm BEFORE clipping.
template <class T>
double clip_grad_norm(std::vector<Parameter<T>>& params, double max_norm) {
  if (!(max_norm > 0.0) || !std::isfinite(max_norm))
    throw ConfigError("max_norm", moekit::detail::str(max_norm), "must be finite and > 0");
  const double norm = global_grad_norm(params);
  detail::scale_to(params, max_norm, norm);
  return norm;
}

// The distributed form: this rank holds the replicated parameters whole and a slice of the experts
// (Parameter::shard). The norm of the full model counts each replicated parameter once (this rank's copy,
// the same bits on every rank), sums the expert slices' squares over the ranks holding different
// slices (sum_expert_slices: an all-reduce of one double over them, e.g. the tp x ep group of a dp
// index) and the tensor slices' (the shared experts') over the tp ranks (sum_tensor_slices; needed
// only when there are any and tp > 1). Every rank gets the same norm and clips by the same factor; a
// non-finite norm throws on every rank alike. Returns the norm before clipping.
template <class T, class SumExpertSlices>
double clip_grad_norm(std::vector<Parameter<T>>& params, double max_norm, SumExpertSlices&& sum_expert_slices,
                      const std::function<void(double*, std::size_t)>& sum_tensor_slices = {}) {
  if (!(max_norm > 0.0) || !std::isfinite(max_norm))
    throw ConfigError("max_norm", moekit::detail::str(max_norm), "must be finite and > 0");
  NormSquares sq;
  for (const auto& p : params) sq.add(p.shard, detail::sum_squares(p.grad, p.numel()));
  sum_expert_slices(&sq.expert_slices, std::size_t(1));
  if (sum_tensor_slices) sum_tensor_slices(&sq.tensor_slices, std::size_t(1));
  const double norm = std::sqrt(sq.total());
  if (!std::isfinite(norm)) throw NumericError("the global gradient norm is not finite");
  detail::scale_to(params, max_norm, norm);
  return norm;
}

}  // namespace moekit::train
