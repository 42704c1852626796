#pragma once
// Linear: y = x W^T (+ b), torch.nn.Linear's layout (W is [out, in]). Both GEMMs of the backward go
// through backend::host::matmul (CBLAS, or bf16 operands with fp32 accumulation after
// set_precision(kBf16): the weights stay fp32 masters); gradients accumulate (+=) so micro-batches add
// up. Keeps no activations: backward takes the forward's input x again.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/backend/host/matmul.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/core/tensor.hpp"

namespace moekit::nn {

template <class T = float>
class Linear {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "nn::Linear<T>: T must be float or double");

 public:
  using value_type = T;

  Linear(std::int64_t in_features, std::int64_t out_features, bool bias = true)
      : in_(in_features), out_(out_features), has_bias_(bias) {
    if (in_features <= 0) throw ConfigError("in_features", std::to_string(in_features), "must be > 0");
    if (out_features <= 0) throw ConfigError("out_features", std::to_string(out_features), "must be > 0");
    weight_.assign(out_ * in_, T(0));
    weight_grad_.assign(out_ * in_, T(0));
    bias_.assign(has_bias_ ? out_ : 0, T(0));
    bias_grad_.assign(has_bias_ ? out_ : 0, T(0));
  }

  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  bool has_bias() const { return has_bias_; }
  T* weight() { return weight_.data(); }
  const T* weight() const { return weight_.data(); }
  T* weight_grad() { return weight_grad_.data(); }
  T* bias() { return bias_.data(); }
  T* bias_grad() { return bias_grad_.data(); }

  // The operands' precision of all three products (forward, dW, dx); kBf16 needs T = float.
  void set_precision(backend::host::MatmulPrecision p) { precision_ = backend::host::checked_precision<T>(p, "nn::Linear"); }
  backend::host::MatmulPrecision precision() const { return precision_; }

  // torch.nn.Linear's default: W and b ~ U(-1/sqrt(in), 1/sqrt(in)); a bound > 0 overrides it.
  void init_params(std::uint64_t seed, double bound = -1.0) {
    SplitMix64 rng(seed);
    const double b = bound > 0 ? bound : 1.0 / std::sqrt(double(in_));
    init_uniform(weight_.data(), out_ * in_, b, rng);
    init_uniform(bias_.data(), std::int64_t(bias_.size()), b, rng);
  }
  void zero_grad() {
    std::fill(weight_grad_.begin(), weight_grad_.end(), T(0));
    std::fill(bias_grad_.begin(), bias_grad_.end(), T(0));
  }

  std::vector<Parameter<T>> parameters(const std::string& prefix = "") {
    std::vector<Parameter<T>> ps{{prefix + "weight", weight_.data(), weight_grad_.data(), {out_, in_}}};
    if (has_bias_) ps.push_back({prefix + "bias", bias_.data(), bias_grad_.data(), {out_}});
    return ps;
  }

  // x [N, in] -> y [N, out] (overwritten).
  void forward(MatrixView<const T> x, MatrixView<T> y) const {
    const std::int64_t rows = x.shape[0];
    check_shape(x, "x", {rows, in_});
    check_shape(y, "y", {rows, out_});
    backend::host::matmul<T>(precision_, false, true, rows, out_, in_, T(1), x.data, weight_.data(), T(0), y.data);
    if (!has_bias_) return;
#pragma omp parallel for schedule(static) if (rows * out_ > kParallelWork)
    for (std::int64_t t = 0; t < rows; ++t) {
      T* yt = y.row(t);
      for (std::int64_t o = 0; o < out_; ++o) yt[o] += bias_[o];
    }
  }

  // dW += dy^T x, db += sum_t dy[t], dx = dy W (overwritten). Pass an empty dx (MatrixView<T>{}) when
  // the input needs no gradient (e.g. it is data).
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx) {
    const std::int64_t rows = x.shape[0];
    check_shape(x, "x", {rows, in_});
    check_shape(dy, "dy", {rows, out_});
    backend::host::matmul<T>(precision_, true, false, out_, in_, rows, T(1), dy.data, x.data, T(1), weight_grad_.data());
    if (has_bias_) {
      // Threads own disjoint column blocks: each sum runs in row order whatever the thread count.
      const std::int64_t blocks = (out_ + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (rows * out_ > kParallelWork)
      for (std::int64_t b = 0; b < blocks; ++b) {
        const std::int64_t c0 = b * kColumnBlock, c1 = std::min(out_, c0 + kColumnBlock);
        for (std::int64_t t = 0; t < rows; ++t) {
          const T* g = dy.row(t);
          for (std::int64_t c = c0; c < c1; ++c) bias_grad_[c] += g[c];
        }
      }
    }
    if (dx.data == nullptr) return;
    check_shape(dx, "dx", {rows, in_});
    backend::host::matmul<T>(precision_, false, false, rows, in_, out_, T(1), dy.data, weight_.data(), T(0), dx.data);
  }

 private:
  static constexpr std::int64_t kParallelWork = 1 << 15;
  static constexpr std::int64_t kColumnBlock = 16;

  std::int64_t in_, out_;
  bool has_bias_;
  backend::host::MatmulPrecision precision_ = backend::host::MatmulPrecision::kNative;
  std::vector<T> weight_, weight_grad_, bias_, bias_grad_;
};

}  // namespace moekit::nn
