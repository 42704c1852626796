#pragma once
// nn::cuda::CrossEntropy: softmax cross-entropy over a vocabulary, averaged over tokens, fused with its
// gradient (nn::softmax_cross_entropy on the device). The mean is taken in double in a fixed order; it
// is the one value that comes back to the host (one 8-byte copy and a stream synchronisation per call).
#include <cmath>
#include <cstdint>
#include <string>

#include "moekit/backend/cuda/nn_ops.cuh"
#include "moekit/core/error.hpp"
#include "moekit/nn/cuda/module.cuh"

namespace moekit::nn::cuda {
inline namespace MOEKIT_CUDA_ABI {

template <class T = float>
class CrossEntropy {
 public:
  using S = bc::storage_t<T>;

  CrossEntropy() : mean_(1), host_(1) {}

  // logits [rows, vocab], targets [rows] (device; check_ids them where they are made). dlogits [rows,
  // vocab] = grad_scale (softmax - onehot) / rows when not null. Returns the mean loss; throws
  // NumericError when it is not finite (a target outside [0, vocab) counts as a NaN loss).
  double operator()(const Context& ctx, const S* logits, const std::int32_t* targets, std::int64_t rows, std::int64_t vocab,
                    S* dlogits = nullptr, double grad_scale = 1.0) {
    grow(token_loss_, rows > 0 ? rows : 1);
    const float scale = rows > 0 ? float(grad_scale / double(rows)) : 0.f;
    MOEKIT_CUDA_CHECK(bc::softmax_cross_entropy(logits, targets, rows, vocab, scale, dlogits, token_loss_.data(), mean_.data(), ctx.stream));
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(host_.data(), mean_.data(), sizeof(double), cudaMemcpyDeviceToHost, ctx.stream));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
    const double loss = host_.data()[0];
    if (!std::isfinite(loss)) throw NumericError("cross-entropy: the mean loss over " + std::to_string(rows) + " tokens is " + moekit::detail::str(loss));
    return loss;
  }
  // Each token's loss of the last call [rows] (device, fp32).
  const float* token_loss() const { return token_loss_.data(); }

 private:
  bc::DeviceArray<float> token_loss_;
  bc::DeviceArray<double> mean_;
  bc::PinnedArray<double> host_;
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::nn::cuda
