#pragma once
// Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_(params, max_norm) with norm_type 2:
// one L2 norm over every gradient of every parameter; when it exceeds max_norm all gradients are
// scaled by max_norm / (norm + 1e-6).
#include <algorithm>
#include <cmath>
#include <cstdint>
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
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    for (auto& p : params) {
      const std::int64_t n = p.numel();
      T* g = p.grad;
#pragma omp parallel for schedule(static) if (n > (1 << 15))
      for (std::int64_t i = 0; i < n; ++i) g[i] = T(double(g[i]) * coef);
    }
  }
  return norm;
}

}  // namespace moekit::train
