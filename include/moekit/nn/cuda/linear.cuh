#pragma once
// nn::cuda::Linear: y = x W^T (W [out, in], torch's layout), no bias (the transformer has none), on
// cuBLAS with fp32 accumulation; dW accumulates (+=) in fp32. The free functions take the weight from
// the caller, for a head tied to the embedding. As the host nn::Linear, keeps no activations: backward
// takes x again.
#include <cstdint>
#include <string>
#include <vector>

#include "moekit/nn/cuda/module.cuh"
#include "moekit/nn/linear.hpp"

namespace moekit::nn::cuda {
inline namespace MOEKIT_CUDA_ABI {

namespace linear_detail {
// cuBLAS takes int dimensions and leading dimensions.
inline void check_gemm_dims(std::int64_t rows, std::int64_t in, std::int64_t out) {
  constexpr std::int64_t kMax = 2147483647;
  if (rows < 0 || rows > kMax) throw ShapeError("Linear: rows = " + std::to_string(rows) + " must be in [0, 2^31 - 1] (cuBLAS int sizes)");
  if (in > kMax || out > kMax) throw ShapeError("Linear: in = " + std::to_string(in) + ", out = " + std::to_string(out) + " exceed 2^31 - 1");
}
}  // namespace linear_detail

// y [rows, out] = x [rows, in] W^T (overwritten).
template <class S>
void linear_forward(const Context& ctx, const S* x, const S* w, std::int64_t rows, std::int64_t in, std::int64_t out, S* y) {
  linear_detail::check_gemm_dims(rows, in, out);
  set_stream(ctx);
  bc::GemmSpec spec;
  spec.ta = false, spec.tb = true, spec.ab = spec.c = bc::data_type<S>();
  MOEKIT_CUBLAS_CHECK(bc::gemm_row_major(ctx.blas, spec, {int(rows), int(out), int(in), x, int(in), w, int(in), y, int(out)}));
}
// dW [out, in] += dy^T x (fp32); dx [rows, in] = dy W (overwritten; skipped when dx is null).
template <class S>
void linear_backward(const Context& ctx, const S* x, const S* w, float* dw, const S* dy, std::int64_t rows, std::int64_t in,
                     std::int64_t out, S* dx) {
  linear_detail::check_gemm_dims(rows, in, out);
  set_stream(ctx);
  bc::GemmSpec spec;
  spec.ta = true, spec.tb = false, spec.ab = bc::data_type<S>(), spec.c = CUDA_R_32F, spec.beta = 1.f;
  MOEKIT_CUBLAS_CHECK(bc::gemm_row_major(ctx.blas, spec, {int(out), int(in), int(rows), dy, int(out), x, int(in), dw, int(in)}));
  if (!dx) return;
  spec.ta = false, spec.c = bc::data_type<S>(), spec.beta = 0.f;
  MOEKIT_CUBLAS_CHECK(bc::gemm_row_major(ctx.blas, spec, {int(rows), int(in), int(out), dy, int(out), w, int(in), dx, int(in)}));
}

template <class T = float>
class Linear {
 public:
  using S = bc::storage_t<T>;

  Linear(std::int64_t in_features, std::int64_t out_features) : in_(check(in_features, "in_features")), out_(check(out_features, "out_features")),
                                                                w_({out_, in_}) {}

  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  DeviceTensor<S>& weight() { return w_; }
  const DeviceTensor<S>& weight() const { return w_; }

  // The host module's values (rounded to S): same initialisation as nn::Linear.
  void load(const moekit::nn::Linear<float>& host) {
    if (host.in_features() != in_ || host.out_features() != out_ || host.has_bias())
      throw ShapeError("nn::cuda::Linear::load: the host Linear is [" + std::to_string(host.out_features()) + ", " +
                       std::to_string(host.in_features()) + "]" + (host.has_bias() ? " with a bias" : "") + ", this one [" +
                       std::to_string(out_) + ", " + std::to_string(in_) + "] without");
    w_.upload(host.weight());
  }
  void zero_grad(cudaStream_t s) { w_.zero_grad(s); }
  std::vector<DeviceParameter> parameters(const std::string& prefix = "") const { return {w_.parameter(prefix + "weight")}; }

  void forward(const Context& ctx, const S* x, std::int64_t rows, S* y) const { linear_forward(ctx, x, w_.value(), rows, in_, out_, y); }
  void backward(const Context& ctx, const S* x, const S* dy, std::int64_t rows, S* dx) {
    linear_backward(ctx, x, w_.value(), w_.grad(), dy, rows, in_, out_, dx);
  }

 private:
  static std::int64_t check(std::int64_t v, const char* name) {
    if (v <= 0 || v > (std::int64_t(1) << 31) - 1) throw ConfigError(name, std::to_string(v), "must be in [1, 2^31)");
    return v;
  }
  std::int64_t in_, out_;
  DeviceTensor<S> w_;
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::nn::cuda
