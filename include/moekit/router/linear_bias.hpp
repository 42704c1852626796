#pragma once
// router::LinearBias<Inner>: a trainable bias on the router logits, logits = W_r x + b (GPT-OSS, whose
// router is an nn.Linear with bias; HF name gate.bias [N_E]). Unlike router::BiasBalanced's selection
// bias (state, outside the gradient), b is a parameter: it moves the scores, the gates and P, and gets
// the gradient db = Σ_t dL/dlogits[t]. Kept in fp32 on every backend's CUDA side, like the other terms
// that meet the fp32 logits. The routing of a token is the inner router's.
#include <cmath>
#include <string>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/options.hpp"
#include "moekit/router/policy.hpp"

namespace moekit::router {

template <class Inner>
struct LinearBias : Inner {
  static_assert(RouterPolicy<Inner> && !router_traits<Inner>::stateful,
                "router::LinearBias<Inner>: Inner must be a stateless router such as router::TopK<router::Softmax>");
  using inner = Inner;
  using options = NoOptions;  // chosen by the option router_bias (layer/policy_switch.hpp)
  static constexpr const char* choice = "router_bias";

  LinearBias() = default;
  explicit LinearBias(const MoeConfig& c) : Inner(c) {}
  static void check(const MoeConfig& c) {
    Inner::check(c);
    const auto* v = c.options.find(choice);
    if (!v || !std::holds_alternative<bool>(*v) || !std::get<bool>(*v))
      throw ConfigError(choice, v ? option_text(*v) : "(missing)", "must be true for the layer's router::LinearBias");
  }
  static void list_choices(std::vector<std::string>& keys) {
    Inner::list_choices(keys);
    keys.push_back(choice);
  }
  // torch.nn.Linear's bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    Inner::declare_parameters(d, c);
    d.add({"router_bias", "gate.bias", 1, {c.num_experts()}, ParamShard::kReplicated, "", "router",
           1.0 / std::sqrt(double(c.d_model)), true});
  }
  static void declare_logits(LogitTerms& t) {
    Inner::declare_logits(t);
    t.push_back({LogitInput::kBias, "router_bias"});
  }
};

}  // namespace moekit::router
