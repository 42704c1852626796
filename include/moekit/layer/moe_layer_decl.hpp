#pragma once
// MoeLayer<Backend, Router, Experts, Balance, Parallel>: the declaration, the policy checks and the one
// runtime-to-type switch (over layer/policy_switch.hpp's rows), without any backend. moekit/moe_layer.hpp adds the host backend; the CUDA
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
#include "moekit/layer/policy_switch.hpp"
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

// cfg.validate(), then what must agree with the compile-time policies of a layer: the router chain
// and its options (layer/policy_switch.hpp's check_policies), the activation and the zero-computation
// kinds the expert set admits.
template <class Router, class Experts>
void validate_layer_config(const MoeConfig& cfg) {
  cfg.validate();
  check_policies<Router, Experts>(cfg);
  using Act = typename Experts::activation;
  using Kinds = experts::zc_kinds<Experts>;
  if (cfg.activation != Act::kind)
    throw ConfigError("activation", field_text(cfg.activation),
                      std::string("must match the layer's compile-time policy (\"") + to_string(Act::kind) + "\")");
  auto kind_allowed = [](const char* field, std::int64_t count, bool allowed, const char* tag) {
    if (count > 0 && !allowed)
      throw ConfigError(field, std::to_string(count),
                        std::string("needs ") + tag + " in the layer's experts::Set<Ffn<Act>, ...>");
  };
  kind_allowed("num_zero_experts", cfg.num_zero_experts, Kinds::zero, "experts::Zero");
  kind_allowed("num_copy_experts", cfg.num_copy_experts, Kinds::copy, "experts::Copy");
  kind_allowed("num_constant_experts", cfg.num_constant_experts, Kinds::constant, "experts::Constant");
  // The other kinds count through options "num_<name>_zc_experts", which N_E adds up: each must be a
  // count the set's kinds read (the layer already refused keys none of its policies declares).
  std::int64_t custom = 0;
  [&]<class... Z>(std::tuple<Z...>*) {
    ((custom += experts::is_builtin_zc<Z> ? 0 : Z::count(cfg)), ...);
  }(static_cast<experts::zc_kinds_t<Experts>*>(nullptr));
  if (custom != cfg.options.zc_experts())
    throw ConfigError("options", std::to_string(cfg.options.zc_experts()) + " experts in \"*_zc_experts\" keys",
                      "must equal the experts of the set's own zero-computation kinds (" + std::to_string(custom) +
                      "): each kind outside MoeConfig counts through one such option");
}
}  // namespace detail

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

// The one runtime switch (layer/policy_switch.hpp): calls f(std::type_identity<MoeLayer<Backend, R, E,
// Balance>>{}) for the router chain R and expert set E the config asks for. Filter: the rows this call
// instantiates (AllRows; Slice<i, n> for one of n translation units: keeps<Slice<i, n>>(cfg) says
// which one handles a config; a config of a row the filter drops is a std::logic_error).
template <class Backend, class Balance = balance::MicroBatch, class Filter = AllRows, class F>
decltype(auto) with_layer_type(const MoeConfig& cfg, F&& f) {
  return with_policies<Filter>(cfg, [&]<class R, class E>(std::type_identity<R>, std::type_identity<E>) -> decltype(auto) {
    return f(std::type_identity<MoeLayer<Backend, R, E, Balance>>{});
  });
}

}  // namespace moekit
