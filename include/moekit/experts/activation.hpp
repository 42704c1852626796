#pragma once
// The FFN experts' activations: each is a small object (trivially copyable, passed to the CUDA kernels
// by value) with its arithmetic as host/device members, compiled by g++ and nvcc:
//   apply(h1, h3)                      a = act(h1[, h3])
//   backward(h1, h3, da, dh1, dh3)     dh1 (and dh3 when gated) from da
// `gated` activations multiply two projections, h1 = W1 x (the gate) and h3 = W3 x (the up projection).
// An activation with options (GPT-OSS's α and limit) declares them as `options` (core/options.hpp) and
// is built from the config; make_activation<A>(cfg) builds any of them. A new activation is one struct
// here (or in the user's code) with its kind, plus its row in the runtime switch.
#include <cmath>
#include <concepts>
#include <tuple>
#include <type_traits>

#include "moekit/core/config.hpp"
#include "moekit/core/macros.hpp"
#include "moekit/core/options.hpp"

namespace moekit::act {

template <class S>
MOEKIT_HD S silu(S h) {
  return h / (S(1) + std::exp(-h));
}
template <class S>
MOEKIT_HD S sigmoid(S h) {
  return S(1) / (S(1) + std::exp(-h));
}

// SwiGLU (Shazeer, arXiv 2002.05202; Mixtral, Qwen, DeepSeek): a = silu(h1) · h3.
struct SwiGLU {
  static constexpr Activation kind = Activation::kSwiGLU;
  static constexpr bool gated = true;
  template <class S>
  MOEKIT_HD S apply(S h1, S h3) const {
    return silu(h1) * h3;
  }
  template <class S>
  MOEKIT_HD void backward(S h1, S h3, S da, S& dh1, S& dh3) const {
    const S sg = sigmoid(h1);
    dh1 = da * h3 * sg * (S(1) + h1 * (S(1) - sg));
    dh3 = da * h1 * sg;
  }
};

// GeLU, the exact erf form (torch.nn.GELU()).
struct GeLU {
  static constexpr Activation kind = Activation::kGeLU;
  static constexpr bool gated = false;
  template <class S>
  MOEKIT_HD S apply(S h1, S) const {
    return S(0.5) * h1 * (S(1) + std::erf(h1 * S(0.70710678118654752440)));
  }
  template <class S>
  MOEKIT_HD void backward(S h1, S, S da, S& dh1, S&) const {
    const S cdf = S(0.5) * (S(1) + std::erf(h1 * S(0.70710678118654752440)));
    const S pdf = std::exp(S(-0.5) * h1 * h1) * S(0.39894228040143267794);
    dh1 = da * (cdf + h1 * pdf);
  }
};

struct ReLU {
  static constexpr Activation kind = Activation::kReLU;
  static constexpr bool gated = false;
  template <class S>
  MOEKIT_HD S apply(S h1, S) const {
    return h1 > S(0) ? h1 : S(0);
  }
  template <class S>
  MOEKIT_HD void backward(S h1, S, S da, S& dh1, S&) const {
    dh1 = h1 > S(0) ? da : S(0);
  }
};

// GPT-OSS's clamped SwiGLU (openai/gpt-oss; transformers' GptOssExperts), w1 the gate, w3 the up:
//   g = min(h1, limit), u = clamp(h3, -limit, limit), a = (u + 1) · g · sigmoid(α g).
// The clamps pass the gradient strictly inside them and none on a bound: torch.clamp's rule with number
// bounds (torch 2.15), which transformers' GPT-OSS experts use, so that bf16 inputs on ±limit agree.
struct SwigluOaiOptions {
  double swiglu_alpha = 1.702;
  double swiglu_limit = 7.0;
  static constexpr auto fields() {
    using R = FieldRule;
    return std::make_tuple(ConfigField<double, SwigluOaiOptions>{"swiglu_alpha", &SwigluOaiOptions::swiglu_alpha, R::kFinitePositive},
                           ConfigField<double, SwigluOaiOptions>{"swiglu_limit", &SwigluOaiOptions::swiglu_limit, R::kFinitePositive});
  }
};
struct SwiGLUOai {
  static constexpr Activation kind = Activation::kSwiGLUOai;
  static constexpr bool gated = true;
  using options = SwigluOaiOptions;
  double alpha = SwigluOaiOptions{}.swiglu_alpha, limit = SwigluOaiOptions{}.swiglu_limit;

  SwiGLUOai() = default;
  explicit SwiGLUOai(const SwigluOaiOptions& o) : alpha(o.swiglu_alpha), limit(o.swiglu_limit) {}
  explicit SwiGLUOai(const MoeConfig& c) : SwiGLUOai(read_options<SwigluOaiOptions>(c)) {}

  template <class S>
  MOEKIT_HD S apply(S h1, S h3) const {
    const S L = S(limit), g = h1 < L ? h1 : L, u = h3 < -L ? -L : h3 > L ? L : h3;
    return (u + S(1)) * g * sigmoid(S(alpha) * g);
  }
  template <class S>
  MOEKIT_HD void backward(S h1, S h3, S da, S& dh1, S& dh3) const {
    const S L = S(limit), g = h1 < L ? h1 : L, u = h3 < -L ? -L : h3 > L ? L : h3;
    const S sg = sigmoid(S(alpha) * g), glu = g * sg;
    dh1 = h1 < L ? da * (u + S(1)) * sg * (S(1) + S(alpha) * g * (S(1) - sg)) : S(0);
    dh3 = (h3 > -L && h3 < L) ? da * glu : S(0);
  }
};

// What an activation provides (the backends call nothing else).
template <class A>
concept ActivationPolicy = std::is_default_constructible_v<A> && std::is_trivially_copyable_v<A> &&
                           requires(const A& a, float h, float& g, double hd, double& gd) {
                             { A::kind } -> std::convertible_to<Activation>;
                             { A::gated } -> std::convertible_to<bool>;
                             { a.apply(h, h) } -> std::same_as<float>;
                             a.backward(h, h, h, g, g);
                             { a.apply(hd, hd) } -> std::same_as<double>;
                             a.backward(hd, hd, hd, gd, gd);
                           };

// The activation of a config: built from its options where it has any.
template <class A>
A make_activation(const MoeConfig& c) {
  if constexpr (std::is_constructible_v<A, const MoeConfig&>) return A(c);
  else return A{};
}

// The free forms, for callers that hold the activation as a value.
template <class A, class S>
MOEKIT_HD S apply(const A& a, S h1, S h3) {
  return a.apply(h1, h3);
}
template <class A, class S>
MOEKIT_HD void backward(const A& a, S h1, S h3, S da, S& dh1, S& dh3) {
  a.backward(h1, h3, da, dh1, dh3);
}

}  // namespace moekit::act
