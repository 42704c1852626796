#pragma once
// MoeLayer<Backend, Router, Experts, Balance, Parallel>: the public entry point (DESIGN §1).
#include <type_traits>
#include <utility>

#include "moekit/balance/policy.hpp"
#include "moekit/core/config.hpp"
#include "moekit/experts/policy.hpp"
#include "moekit/parallel/policy.hpp"
#include "moekit/router/policy.hpp"

namespace moekit {

namespace detail {
template <class...>
inline constexpr bool dependent_false = false;
}

// Results of the aux losses of the last forward (unscaled by their coefficients).
struct AuxLosses {
  double lbl = 0.0;
  double zloss = 0.0;
};

// Primary template: only the specialisations for a backend exist.
template <class Backend, class Router, class Experts, class Balance = balance::MicroBatch,
          class Parallel = parallel::None>
class MoeLayer {
  static_assert(detail::dependent_false<Backend, Parallel>,
                "moekit::MoeLayer: no implementation for this Backend/Parallel combination "
                "(available: backend::Host<float|double> with parallel::None)");
};

// The one runtime switch from MoeConfig's router/activation to the policy types: calls
// f(std::type_identity<MoeLayer<Backend, R, E, Balance>>{}) for the matching combination.
template <class Backend, class Balance = balance::MicroBatch, class F>
decltype(auto) with_layer_type(const MoeConfig& cfg, F&& f) {
  auto by_act = [&]<class R>(std::type_identity<R>) -> decltype(auto) {
    switch (cfg.activation) {
      case Activation::kSwiGLU:
        return f(std::type_identity<MoeLayer<Backend, R, experts::Ffn<act::SwiGLU>, Balance>>{});
      case Activation::kGeLU:
        return f(std::type_identity<MoeLayer<Backend, R, experts::Ffn<act::GeLU>, Balance>>{});
      case Activation::kReLU:
        return f(std::type_identity<MoeLayer<Backend, R, experts::Ffn<act::ReLU>, Balance>>{});
    }
    throw ConfigError("activation", std::to_string(int(cfg.activation)), "must be swiglu, gelu or relu");
  };
  switch (cfg.router) {
    case RouterKind::kSoftmax: return by_act(std::type_identity<router::TopK<router::Softmax>>{});
    case RouterKind::kSigmoid: return by_act(std::type_identity<router::TopK<router::Sigmoid>>{});
  }
  throw ConfigError("router", std::to_string(int(cfg.router)), "must be softmax or sigmoid");
}

}  // namespace moekit

#include "moekit/backend/host/moe_layer.hpp"
