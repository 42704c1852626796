#pragma once
// nn::cuda::RMSNorm: y = x / sqrt(mean(x²) + eps) · g per row (nn::RMSNorm), fp32 math; the weight's
// gradient accumulates in fp32 through per-chunk partial sums added in order (no atomics). Keeps no
// activations: backward takes x again.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moekit/backend/cuda/nn_ops.cuh"
#include "moekit/nn/cuda/module.cuh"
#include "moekit/nn/rms_norm.hpp"

namespace moekit::nn::cuda {
inline namespace MOEKIT_CUDA_ABI {

template <class T = float>
class RMSNorm {
 public:
  using S = bc::storage_t<T>;

  explicit RMSNorm(std::int64_t dim, double eps = 1e-6) : d_(dim), eps_(eps), w_({dim > 0 ? dim : 1}) {
    moekit::nn::RMSNorm<float> check(dim, eps);  // the host module's rules for dim and eps
    if (dim > (1 << 30)) throw ConfigError("dim", std::to_string(dim), "must be at most 2^30");
    w_.upload(check.weight());  // ones
  }

  std::int64_t dim() const { return d_; }
  DeviceTensor<S>& weight() { return w_; }
  const DeviceTensor<S>& weight() const { return w_; }

  void load(const moekit::nn::RMSNorm<float>& host) {
    if (host.dim() != d_) throw ShapeError("nn::cuda::RMSNorm::load: the host norm has dim " + std::to_string(host.dim()));
    w_.upload(host.weight());
  }
  void zero_grad(cudaStream_t s) { w_.zero_grad(s); }
  std::vector<DeviceParameter> parameters(const std::string& prefix = "") const { return {w_.parameter(prefix + "weight")}; }

  // x, y [rows, dim]; y may alias x.
  void forward(const Context& ctx, const S* x, std::int64_t rows, S* y) const {
    MOEKIT_CUDA_CHECK(bc::rms_norm_forward(x, w_.value(), rows, d_, float(eps_), y, ctx.stream));
  }
  // dx [rows, dim] overwritten (must not alias x or dy), dg += Σ_t dy_t x_t r_t.
  void backward(const Context& ctx, const S* x, const S* dy, std::int64_t rows, S* dx) {
    grow(workspace_, bc::rms_norm_backward_workspace(rows, d_));
    MOEKIT_CUDA_CHECK(bc::rms_norm_backward(x, w_.value(), dy, rows, d_, float(eps_), dx, w_.grad(), workspace_.data(), ctx.stream));
  }

 private:
  std::int64_t d_;
  double eps_;
  DeviceTensor<S> w_;
  bc::DeviceArray<float> workspace_;
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::nn::cuda
