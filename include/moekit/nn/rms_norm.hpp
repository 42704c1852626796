#pragma once
// RMSNorm (Zhang & Sennrich 2019, as in LLaMA): y = x / sqrt(mean(x^2) + eps) * g, per row.
// Keeps no activations: backward takes x again and recomputes the per-row 1/rms (one pass over x).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/core/tensor.hpp"

namespace moekit::nn {

template <class T = float>
class RMSNorm {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "nn::RMSNorm<T>: T must be float or double");

 public:
  using value_type = T;

  explicit RMSNorm(std::int64_t dim, double eps = 1e-6) : d_(dim), eps_(eps) {
    if (dim <= 0) throw ConfigError("dim", std::to_string(dim), "must be > 0");
    if (!(eps > 0.0) || !std::isfinite(eps)) throw ConfigError("eps", detail::str(eps), "must be finite and > 0");
    weight_.assign(d_, T(1));
    grad_.assign(d_, T(0));
  }

  std::int64_t dim() const { return d_; }
  double eps() const { return eps_; }
  T* weight() { return weight_.data(); }
  const T* weight() const { return weight_.data(); }
  T* grad() { return grad_.data(); }

  void init_params() { std::fill(weight_.begin(), weight_.end(), T(1)); }  // torch: ones
  void zero_grad() { std::fill(grad_.begin(), grad_.end(), T(0)); }

  std::vector<Parameter<T>> parameters(const std::string& prefix = "") {
    return {{prefix + "weight", weight_.data(), grad_.data(), {d_}}};
  }

  // x, y: [N, dim]; y overwritten (may alias x).
  void forward(MatrixView<const T> x, MatrixView<T> y) const {
    const std::int64_t rows = x.shape[0];
    check_shape(x, "x", {rows, d_});
    check_shape(y, "y", {rows, d_});
#pragma omp parallel for schedule(static) if (rows * d_ > kParallelWork)
    for (std::int64_t t = 0; t < rows; ++t) {
      const T* xt = x.row(t);
      T* yt = y.row(t);
      const T r = rstd(xt);
      for (std::int64_t c = 0; c < d_; ++c) yt[c] = xt[c] * r * weight_[c];
    }
  }

  // With r = 1/sqrt(mean(x^2) + eps):
  //   dx_j = r * (g_j dy_j - x_j * r^2 * mean_i(g_i dy_i x_i))   (overwritten)
  //   dg_j += sum_t dy_tj * x_tj * r_t                           (accumulated)
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx) {
    const std::int64_t rows = x.shape[0];
    check_shape(x, "x", {rows, d_});
    check_shape(dy, "dy", {rows, d_});
    check_shape(dx, "dx", {rows, d_});
    if (std::int64_t(rstd_.size()) < rows) rstd_.resize(rows);  // grows only
#pragma omp parallel for schedule(static) if (rows * d_ > kParallelWork)
    for (std::int64_t t = 0; t < rows; ++t) {
      const T* xt = x.row(t);
      const T* gt = dy.row(t);
      T* dxt = dx.row(t);
      const T r = rstd(xt);
      rstd_[t] = r;
      T dot = 0;
      for (std::int64_t c = 0; c < d_; ++c) dot += weight_[c] * gt[c] * xt[c];
      const T coef = r * r * dot / T(d_);
      for (std::int64_t c = 0; c < d_; ++c) dxt[c] = r * (weight_[c] * gt[c] - xt[c] * coef);
    }
    // Threads own disjoint column blocks of dg: sums run in row order whatever the thread count.
    const std::int64_t blocks = (d_ + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (rows * d_ > kParallelWork)
    for (std::int64_t b = 0; b < blocks; ++b) {
      const std::int64_t c0 = b * kColumnBlock, c1 = std::min(d_, c0 + kColumnBlock);
      for (std::int64_t t = 0; t < rows; ++t) {
        const T* xt = x.row(t);
        const T* gt = dy.row(t);
        for (std::int64_t c = c0; c < c1; ++c) grad_[c] += gt[c] * xt[c] * rstd_[t];
      }
    }
  }

 private:
  static constexpr std::int64_t kParallelWork = 1 << 15;
  static constexpr std::int64_t kColumnBlock = 16;

  T rstd(const T* xt) const {
    T ss = 0;
    for (std::int64_t c = 0; c < d_; ++c) ss += xt[c] * xt[c];
    return T(1) / std::sqrt(ss / T(d_) + T(eps_));
  }

  std::int64_t d_;
  double eps_;
  std::vector<T> weight_, grad_;
  std::vector<T> rstd_;  // backward's scratch: 1/rms of each row
};

}  // namespace moekit::nn
