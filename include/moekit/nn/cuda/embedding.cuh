#pragma once
// nn::cuda::Embedding: rows of a [num_embeddings, dim] table looked up by int32 ids on the device
// (nn::Embedding with one id per row). The backward adds each id's gradient rows in token order
// without atomics (backend/cuda/nn_ops.cuh): the same bits on every run.
#include <cstdint>
#include <string>
#include <vector>

#include "moekit/backend/cuda/nn_ops.cuh"
#include "moekit/nn/cuda/module.cuh"
#include "moekit/nn/embedding.hpp"

namespace moekit::nn::cuda {
inline namespace MOEKIT_CUDA_ABI {

// Throws ShapeError naming the first id outside [0, n) (host ids, before they are uploaded).
inline void check_ids(const std::int32_t* ids, std::int64_t count, std::int64_t n, const char* what = "ids") {
  for (std::int64_t i = 0; i < count; ++i)
    if (ids[i] < 0 || ids[i] >= n)
      throw ShapeError(std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(ids[i]) + " is outside [0, " +
                       std::to_string(n) + ")");
}

template <class T = float>
class Embedding {
 public:
  using S = bc::storage_t<T>;

  Embedding(std::int64_t num_embeddings, std::int64_t dim) : n_(num_embeddings), d_(dim), w_({check(num_embeddings, "num_embeddings"), check(dim, "dim")}) {}

  std::int64_t num_embeddings() const { return n_; }
  std::int64_t dim() const { return d_; }
  DeviceTensor<S>& weight() { return w_; }
  const DeviceTensor<S>& weight() const { return w_; }

  void load(const moekit::nn::Embedding<float>& host) {
    if (host.num_embeddings() != n_ || host.dim() != d_) throw ShapeError("nn::cuda::Embedding::load: the host table has another shape");
    w_.upload(host.weight());
  }
  void zero_grad(cudaStream_t s) { w_.zero_grad(s); }
  std::vector<DeviceParameter> parameters(const std::string& prefix = "") const { return {w_.parameter(prefix + "weight")}; }

  // out [rows, dim] = table[ids] (ids: device, in [0, n): check_ids them where they are made; an id
  // outside gives a row of NaN, never a read out of bounds).
  void forward(const Context& ctx, const std::int32_t* ids, std::int64_t rows, S* out) const {
    MOEKIT_CUDA_CHECK(bc::embedding_forward(w_.value(), ids, rows, d_, n_, out, ctx.stream));
  }
  // grad[ids[t]] += dout[t].
  void backward(const Context& ctx, const std::int32_t* ids, const S* dout, std::int64_t rows) {
    bc::EmbeddingBackwardWorkspace w;
    MOEKIT_CUDA_CHECK(bc::embedding_backward_workspace(rows, n_, w));
    if (workspace_.size() < w.total_bytes) workspace_.resize(w.total_bytes);
    MOEKIT_CUDA_CHECK(bc::embedding_backward(ids, dout, rows, d_, n_, w_.grad(), workspace_.data(), workspace_.size(), ctx.stream));
  }

 private:
  static std::int64_t check(std::int64_t v, const char* name) {
    if (v <= 0 || v > (std::int64_t(1) << 31) - 1) throw ConfigError(name, std::to_string(v), "must be in [1, 2^31)");
    return v;
  }
  std::int64_t n_, d_;
  DeviceTensor<S> w_;
  bc::DeviceArray<char> workspace_;  // the backward's sort (grows; cudaMalloc aligns it to 256 bytes)
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::nn::cuda
