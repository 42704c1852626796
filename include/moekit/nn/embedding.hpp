#pragma once
// Embedding: rows of a [num_embeddings, dim] table looked up by int32 ids (torch.nn.Embedding).
// With ids of shape [T, J] each output row is the SUM of its J lookups (torch.nn.EmbeddingBag with
// mode="sum"), which is how a trainer embeds a window of tokens with position-specific tables.
//
// Like every nn module here, it owns its parameters and their gradients but keeps no activations:
// backward takes the forward's inputs again, so one module may be applied several times per step.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/core/tensor.hpp"

namespace moekit::nn {

template <class T = float>
class Embedding {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "nn::Embedding<T>: T must be float or double");

 public:
  using value_type = T;

  Embedding(std::int64_t num_embeddings, std::int64_t dim) : n_(num_embeddings), d_(dim) {
    if (num_embeddings <= 0) throw ConfigError("num_embeddings", std::to_string(num_embeddings), "must be > 0");
    if (dim <= 0) throw ConfigError("dim", std::to_string(dim), "must be > 0");
    weight_.assign(n_ * d_, T(0));
    grad_.assign(n_ * d_, T(0));
  }

  std::int64_t num_embeddings() const { return n_; }
  std::int64_t dim() const { return d_; }
  T* weight() { return weight_.data(); }
  const T* weight() const { return weight_.data(); }
  T* grad() { return grad_.data(); }
  const T* grad() const { return grad_.data(); }

  // U(-bound, bound) from SplitMix64 (identical on every platform) instead of torch's N(0, 1).
  void init_params(std::uint64_t seed, double bound = 1.0) {
    SplitMix64 rng(seed);
    init_uniform(weight_.data(), n_ * d_, bound, rng);
  }
  void zero_grad() { std::fill(grad_.begin(), grad_.end(), T(0)); }

  std::vector<Parameter<T>> parameters(const std::string& prefix = "") {
    return {{prefix + "weight", weight_.data(), grad_.data(), {n_, d_}}};
  }

  // out[t] = sum_j weight[ids[t, j]]; ids [T, J], out [T, dim] (overwritten).
  void forward(MatrixView<const std::int32_t> ids, MatrixView<T> out) const {
    const std::int64_t rows = ids.shape[0], bag = ids.shape[1];
    check_shape(ids, "ids", {rows, bag});
    check_shape(out, "out", {rows, d_});
    check_ids(ids);
#pragma omp parallel for schedule(static) if (rows * bag * d_ > kParallelWork)
    for (std::int64_t t = 0; t < rows; ++t) {
      T* o = out.row(t);
      std::fill_n(o, d_, T(0));
      for (std::int64_t j = 0; j < bag; ++j) {
        const T* w = &weight_[std::int64_t(ids.data[t * bag + j]) * d_];
        for (std::int64_t c = 0; c < d_; ++c) o[c] += w[c];
      }
    }
  }
  void forward(VectorView<const std::int32_t> ids, MatrixView<T> out) const { forward(as_bag(ids), out); }

  // grad[ids[t, j]] += dout[t] for every (t, j). Threads own disjoint column blocks of the table, so
  // repeated ids never race and each sum is taken in token order whatever the thread count.
  void backward(MatrixView<const std::int32_t> ids, MatrixView<const T> dout) {
    const std::int64_t rows = ids.shape[0], bag = ids.shape[1];
    check_shape(ids, "ids", {rows, bag});
    check_shape(dout, "dout", {rows, d_});
    check_ids(ids);
    const std::int64_t blocks = (d_ + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (rows * bag * d_ > kParallelWork)
    for (std::int64_t b = 0; b < blocks; ++b) {
      const std::int64_t c0 = b * kColumnBlock, c1 = std::min(d_, c0 + kColumnBlock);
      for (std::int64_t t = 0; t < rows; ++t) {
        const T* g = dout.row(t);
        for (std::int64_t j = 0; j < bag; ++j) {
          T* acc = &grad_[std::int64_t(ids.data[t * bag + j]) * d_];
          for (std::int64_t c = c0; c < c1; ++c) acc[c] += g[c];
        }
      }
    }
  }
  void backward(VectorView<const std::int32_t> ids, MatrixView<const T> dout) { backward(as_bag(ids), dout); }

 private:
  static constexpr std::int64_t kParallelWork = 1 << 15;  // below this, threads cost more than they save
  static constexpr std::int64_t kColumnBlock = 16;        // 64 bytes of float: one cache line per block row

  static MatrixView<const std::int32_t> as_bag(VectorView<const std::int32_t> ids) {
    if (!ids.is_contiguous()) throw ShapeError("ids must be contiguous");
    return {ids.data, {ids.shape[0], 1}};
  }
  void check_ids(MatrixView<const std::int32_t> ids) const {
    const std::int64_t total = ids.shape[0] * ids.shape[1];
    for (std::int64_t i = 0; i < total; ++i) {
      const std::int32_t v = ids.data[i];
      if (v < 0 || v >= n_)
        throw ShapeError("ids[" + std::to_string(i / ids.shape[1]) + ", " + std::to_string(i % ids.shape[1]) +
                         "] = " + std::to_string(v) + " is outside [0, " + std::to_string(n_) + ")");
    }
  }

  std::int64_t n_, d_;
  std::vector<T> weight_, grad_;
};

}  // namespace moekit::nn
