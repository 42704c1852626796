#pragma once
// MoeLayer<Backend, Router, Experts, Balance, Parallel>: the declaration, the policy checks and the one
// runtime-to-type switch, without any backend. moekit/moe_layer.hpp adds the host backend; the CUDA
// backend (backend/cuda/moe_layer.cuh) includes only this, so no CUDA translation unit pulls in CBLAS
// or OpenMP through it.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "moekit/balance/policy.hpp"
#include "moekit/core/config.hpp"
#include "moekit/experts/policy.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/parallel/policy.hpp"
#include "moekit/router/bias_balanced.hpp"
#include "moekit/router/policy.hpp"

namespace moekit {

namespace detail {
template <class...>
inline constexpr bool dependent_false = false;

// The policy checks every backend's layer makes; the messages read like documentation.
template <class Router, class Experts, class Balance>
struct PolicyChecks {
  static_assert(router::RouterPolicy<Router>, "MoeLayer: Router must be a router policy such as router::TopK<router::Softmax>");
  static_assert(experts::ExpertPolicy<Experts>, "MoeLayer: Experts must be experts::Ffn<Act> or experts::Set<Ffn<Act>, ...>");
  static_assert(balance::BalancePolicy<Balance>, "MoeLayer: Balance must be balance::MicroBatch or balance::GlobalBatch");
  static constexpr bool ok = true;
};

// cfg.validate(), then the runtime fields that must agree with the compile-time policies of a layer.
template <class Router, class Experts>
void validate_layer_config(const MoeConfig& cfg) {
  cfg.validate();
  using Act = typename Experts::activation;
  using Kinds = experts::zc_kinds<Experts>;
  auto must_match = [](const char* field, const std::string& got, const std::string& want) {
    if (got != want) throw ConfigError(field, got, "must match the layer's compile-time policy (" + want + ")");
  };
  must_match("router", to_string(cfg.router), to_string(Router::kind));
  must_match("activation", to_string(cfg.activation), to_string(Act::kind));
  must_match("gating_residual", cfg.gating_residual ? "true" : "false", Router::residual ? "true" : "false");
  must_match("expert_bias", cfg.expert_bias ? "true" : "false", Router::biased ? "true" : "false");
  auto kind_allowed = [](const char* field, std::int64_t count, bool allowed, const char* tag) {
    if (count > 0 && !allowed)
      throw ConfigError(field, std::to_string(count),
                        std::string("needs ") + tag + " in the layer's experts::Set<Ffn<Act>, ...>");
  };
  kind_allowed("num_zero_experts", cfg.num_zero_experts, Kinds::zero, "experts::Zero");
  kind_allowed("num_copy_experts", cfg.num_copy_experts, Kinds::copy, "experts::Copy");
  kind_allowed("num_constant_experts", cfg.num_constant_experts, Kinds::constant, "experts::Constant");
}
}


// The layer: one class template for every backend and strategy, defined in layer/pipeline.hpp (the
// stages, written once) over the backend's operations, which layer_ops names.
template <class Backend, class Router, class Experts, class Balance = balance::MicroBatch,
          class Parallel = parallel::None>
class MoeLayer;

// layer_ops<Backend, Router, Experts, Balance, Parallel>::type: the backend's stage bodies and buffers
// (backend/host/layer_ops.hpp, backend/cuda/layer_ops.cuh specialise it). The primary template is the
// combination no included backend implements.
template <class Backend, class Router, class Experts, class Balance, class Parallel>
struct layer_ops {
  static_assert(detail::dependent_false<Backend, Parallel>,
                "moekit::MoeLayer: no implementation for this Backend/Parallel combination in this translation unit. "
                "Available: backend::Host<float|double> (<moekit/moe_layer.hpp>) and backend::Cuda<float|bf16> "
                "(<moekit/backend/cuda/moe_layer.cuh>, in a .cu file built by nvcc) with parallel::None; "
                "parallel::Data|Expert|Tensor|Hybrid through <moekit/parallel/host_moe_layer.hpp> (host, over "
                "comm::Mpi or comm::Single) or <moekit/parallel/cuda_moe_layer.cuh> (CUDA, over comm::Nccl)");
};

// The one runtime switch from MoeConfig to the policy types: router (softmax | sigmoid) x gating residual
// x expert bias (router::BiasBalanced) x activation (swiglu | gelu | relu); the experts are Ffn<Act>, or Set<Ffn<Act>, Zero, Copy, Constant>
// when the config has zero-computation experts. Calls f(std::type_identity<MoeLayer<...>>{}).
// kBias: which of the two router families a call instantiates. kBoth (the default) follows
// cfg.expert_bias; kUnbiased / kBiased instantiate half of the types (a program may split them over two
// translation units, as moekit-layer's CUDA runs do, to bound nvcc's time per unit) and refuse a config
// of the other half with std::logic_error.
enum class BiasVariants { kBoth, kUnbiased, kBiased };
template <class Backend, class Balance = balance::MicroBatch, BiasVariants kBias = BiasVariants::kBoth, class F>
decltype(auto) with_layer_type(const MoeConfig& cfg, F&& f) {
  auto by_experts = [&]<class R, class A>(std::type_identity<R>, std::type_identity<A>) -> decltype(auto) {
    using Mixed = experts::Set<experts::Ffn<A>, experts::Zero, experts::Copy, experts::Constant>;
    if (cfg.num_zc_experts() > 0) return f(std::type_identity<MoeLayer<Backend, R, Mixed, Balance>>{});
    return f(std::type_identity<MoeLayer<Backend, R, experts::Ffn<A>, Balance>>{});
  };
  auto by_act = [&]<class R>(std::type_identity<R> r) -> decltype(auto) {
    switch (cfg.activation) {
      case Activation::kSwiGLU: return by_experts(r, std::type_identity<act::SwiGLU>{});
      case Activation::kGeLU: return by_experts(r, std::type_identity<act::GeLU>{});
      case Activation::kReLU: return by_experts(r, std::type_identity<act::ReLU>{});
    }
    throw ConfigError("activation", std::to_string(int(cfg.activation)), "must be swiglu, gelu or relu");
  };
  auto by_bias = [&]<class R>(std::type_identity<R> r) -> decltype(auto) {
    if constexpr (kBias == BiasVariants::kBoth) {
      if (cfg.expert_bias) return by_act(std::type_identity<router::BiasBalanced<R>>{});
      return by_act(r);
    } else {
      constexpr bool biased = kBias == BiasVariants::kBiased;
      if (cfg.expert_bias != biased)
        throw std::logic_error(std::string("with_layer_type: this call instantiates only the ") +
                               (biased ? "biased" : "unbiased") + " routers, but the config has expert_bias " +
                               (cfg.expert_bias ? "true" : "false"));
      if constexpr (biased) return by_act(std::type_identity<router::BiasBalanced<R>>{});
      else return by_act(r);
    }
  };
  auto by_residual = [&]<class R>(std::type_identity<R> r) -> decltype(auto) {
    if (cfg.gating_residual) return by_bias(std::type_identity<router::GatingResidual<R>>{});
    return by_bias(r);
  };
  switch (cfg.router) {
    case RouterKind::kSoftmax: return by_residual(std::type_identity<router::TopK<router::Softmax>>{});
    case RouterKind::kSigmoid: return by_residual(std::type_identity<router::TopK<router::Sigmoid>>{});
  }
  throw ConfigError("router", std::to_string(int(cfg.router)), "must be softmax or sigmoid");
}

}  // namespace moekit
