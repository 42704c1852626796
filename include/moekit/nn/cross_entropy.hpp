#pragma once
// Softmax cross-entropy over a vocabulary, averaged over tokens (torch.nn.functional.cross_entropy
// with reduction="mean"), fused with its gradient: the loss and dlogits come from one pass.
//
//   loss_t   = logsumexp(logits_t) - logits_t[target_t]
//   loss     = (1/N) sum_t loss_t
//   dlogits_t = grad_scale * (softmax(logits_t) - onehot(target_t)) / N
//
// grad_scale lets a trainer average over gradient-accumulation micro-batches (grad_scale = 1/m).
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/tensor.hpp"

namespace moekit::nn {

// Returns the mean loss (accumulated in double). logits [N, V]; targets [N] in [0, V).
// dlogits [N, V] is written when it has data (pass MatrixView<T>{} for a forward-only evaluation);
// token_loss [N] receives each token's loss when it has data.
// Throws ShapeError for a target outside [0, V) (naming the token and the value) and NumericError
// when a token's loss is not finite.
template <class T>
double softmax_cross_entropy(MatrixView<const T> logits, VectorView<const std::int32_t> targets,
                             MatrixView<T> dlogits = {}, VectorView<T> token_loss = {}, double grad_scale = 1.0) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "softmax_cross_entropy: T must be float or double");
  const std::int64_t rows = logits.shape[0], vocab = logits.shape[1];
  check_shape(logits, "logits", {rows, vocab});
  check_shape(targets, "targets", {rows});
  if (dlogits.data != nullptr) check_shape(dlogits, "dlogits", {rows, vocab});
  if (token_loss.data != nullptr) check_shape(token_loss, "token_loss", {rows});
  if (rows == 0) return 0.0;
  if (vocab <= 0) throw ShapeError("logits has an empty vocabulary dimension");
  for (std::int64_t t = 0; t < rows; ++t) {
    const std::int32_t y = targets.data[t];
    if (y < 0 || y >= vocab)
      throw ShapeError("targets[" + std::to_string(t) + "] = " + std::to_string(y) + " is outside [0, " +
                       std::to_string(vocab) + ")");
  }

  // Per-token losses go to a buffer and are summed in token order, so the mean does not depend on
  // the thread count (an OpenMP reduction would add the partial sums in arrival order).
  std::vector<double> own;
  double* loss_t = nullptr;
  if constexpr (std::is_same_v<T, double>) loss_t = token_loss.data;
  if (loss_t == nullptr) {
    own.resize(rows);
    loss_t = own.data();
  }
  const T scale = T(grad_scale / double(rows));
#pragma omp parallel for schedule(static) if (rows * vocab > (1 << 15))
  for (std::int64_t t = 0; t < rows; ++t) {
    const T* l = logits.row(t);
    T mx = l[0];
    for (std::int64_t v = 1; v < vocab; ++v) mx = l[v] > mx ? l[v] : mx;
    T sum = 0;
    for (std::int64_t v = 0; v < vocab; ++v) sum += std::exp(l[v] - mx);
    const T lse = mx + std::log(sum);
    const std::int32_t y = targets.data[t];
    loss_t[t] = double(lse) - double(l[y]);
    if (dlogits.data != nullptr) {
      T* g = dlogits.row(t);
      for (std::int64_t v = 0; v < vocab; ++v) g[v] = scale * std::exp(l[v] - lse);
      g[y] -= scale;
    }
  }
  double total = 0.0;
  for (std::int64_t t = 0; t < rows; ++t) {
    if (!std::isfinite(loss_t[t]))
      throw NumericError("cross-entropy of token " + std::to_string(t) + " is " + detail::str(loss_t[t]) +
                         " (its logits contain NaN or Inf)");
    total += loss_t[t];
  }
  if constexpr (std::is_same_v<T, float>)
    if (token_loss.data != nullptr)
      for (std::int64_t t = 0; t < rows; ++t) token_loss.data[t] = float(loss_t[t]);
  return total / double(rows);
}

}  // namespace moekit::nn
