#pragma once
// Element-wise activations and their derivatives, host/device.
#include <cmath>

#include "moekit/core/macros.hpp"
#include "moekit/experts/policy.hpp"

namespace moekit::act {

template <class S>
MOEKIT_HD S silu(S h) {
  return h / (S(1) + std::exp(-h));
}

// a = act(h1[, h3]).
template <class S>
MOEKIT_HD S apply(ReLU, S h1, S) { return h1 > S(0) ? h1 : S(0); }
template <class S>
MOEKIT_HD S apply(GeLU, S h1, S) { return S(0.5) * h1 * (S(1) + std::erf(h1 * S(0.70710678118654752440))); }
template <class S>
MOEKIT_HD S apply(SwiGLU, S h1, S h3) { return silu(h1) * h3; }

// Given da, write dh1 (and dh3 for gated activations).
template <class S>
MOEKIT_HD void backward(ReLU, S h1, S, S da, S& dh1, S&) { dh1 = h1 > S(0) ? da : S(0); }
template <class S>
MOEKIT_HD void backward(GeLU, S h1, S, S da, S& dh1, S&) {
  const S cdf = S(0.5) * (S(1) + std::erf(h1 * S(0.70710678118654752440)));
  const S pdf = std::exp(S(-0.5) * h1 * h1) * S(0.39894228040143267794);
  dh1 = da * (cdf + h1 * pdf);
}
template <class S>
MOEKIT_HD void backward(SwiGLU, S h1, S h3, S da, S& dh1, S& dh3) {
  const S sg = S(1) / (S(1) + std::exp(-h1));
  dh1 = da * h3 * sg * (S(1) + h1 * (S(1) - sg));
  dh3 = da * h1 * sg;
}

}  // namespace moekit::act
