#pragma once
// Router policies (docs/design.md §2). A router type carries its behaviour, so the backends never test which
// router they run:
//   score                      the score function (router/score.hpp)
//   kind, residual, biased     what MoeConfig must say for it (router, gating_residual, expert_bias)
//   stateful                   whether it keeps per-expert state across steps (router/state.hpp)
//   route(...)                 the per-token forward functor (MOEKIT_HD: g++ and nvcc), given the
//                              state's values (null for a stateless router)
//   route_backward(...)        its backward
//   capacity_score(l, p)       the score capacity drops by (lowest first)
//   declare_parameters(d, cfg) its trainable tensors (core/parameter.hpp's ParamFamily), which
//                              the parameter table names and lays out
// and, when stateful, end_step(values, step_counts, cfg) (the hook after each optimizer step) and
// step_update(step_counts, cfg) (what the hook would add). Adding a router is one header like
// router/bias_balanced.hpp; MoeConfig's fields and the one runtime switch (with_layer_type) only name
// it where it is to be chosen at run time.
#include <cmath>
#include <concepts>
#include <cstdint>
#include <utility>
#include <type_traits>

#include "moekit/core/config.hpp"
#include "moekit/core/macros.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/router/score.hpp"
#include "moekit/router/topk.hpp"

namespace moekit::router {

// Top-k router over all experts; the score function picks probabilities and gates (router/topk.hpp).
template <class Score>
struct TopK {
  static_assert(ScoreFunction<Score>, "router::TopK<Score>: Score must be router::Softmax or router::Sigmoid");
  using score = Score;
  static constexpr RouterKind kind = Score::kind;
  static constexpr bool residual = false;
  static constexpr bool biased = false;
  static constexpr bool stateful = false;

  // The router weight W_r (logits = x W_r^T).
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    d.add({"router", "gate.weight", 1, {c.num_experts(), c.d_model}, ParamShard::kReplicated, "", "router",
           1.0 / std::sqrt(double(c.d_model)), false});
  }
  // One token: prob[n] (P of the balance loss), idx[k], gate[k]; returns the logsumexp (z-loss).
  template <class S>
  MOEKIT_HD static S route(const S* logit, int n, int k, bool renormalize, S* prob, int* idx, S* gate, const S* /*state*/) {
    return route_token(Score{}, logit, n, k, renormalize, prob, idx, gate);
  }
  // dlogit[n] from dgate[k], the balance loss's dprob[n] and the z-loss's d/d(lse); scratch: n values.
  template <class S>
  MOEKIT_HD static void route_backward(const S* logit, int n, int k, bool renormalize, const S* prob, const int* idx,
                                       const S* gate, const S* dgate, const S* dprob, S zcoef, S* scratch, S* dlogit) {
    route_token_backward(Score{}, logit, n, k, renormalize, prob, idx, gate, dgate, dprob, zcoef, scratch, dlogit);
  }
  template <class S>
  MOEKIT_HD static S capacity_score(S logit, S prob) {
    return router::capacity_score(Score{}, logit, prob);
  }
};

template <class R>
concept RouterPolicy = requires {
  typename R::score;
  { R::kind } -> std::convertible_to<RouterKind>;
  { R::residual } -> std::convertible_to<bool>;
  { R::biased } -> std::convertible_to<bool>;
  { R::stateful } -> std::convertible_to<bool>;
  { R::template capacity_score<float>(0.f, 0.f) } -> std::convertible_to<float>;
  R::declare_parameters(std::declval<ParamDecls&>(), std::declval<const MoeConfig&>());
};

// The backward and the capacity score of a router that wraps Inner and routes a token as Inner does
// (GatingResidual, BiasBalanced): inherited, so they are written once.
template <class Inner>
struct InnerRouting {
  template <class S>
  MOEKIT_HD static void route_backward(const S* logit, int n, int k, bool renormalize, const S* prob, const int* idx,
                                       const S* gate, const S* dgate, const S* dprob, S zcoef, S* scratch, S* dlogit) {
    Inner::route_backward(logit, n, k, renormalize, prob, idx, gate, dgate, dprob, zcoef, scratch, dlogit);
  }
  template <class S>
  MOEKIT_HD static S capacity_score(S logit, S prob) {
    return Inner::capacity_score(logit, prob);
  }
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) { Inner::declare_parameters(d, c); }
};

// MoE++ gating residual (arXiv 2410.07348): logits^j = W^j x^j + W_g^j logits^{j-1}, W_g^j [N_E, N_E].
// The first MoE layer of a model gets no previous logits and uses W x alone. The residual changes the
// logits (a parameter of the layer), not the routing of a token: the functors are the inner router's.
template <class Inner>
struct GatingResidual : InnerRouting<Inner> {
  static_assert(RouterPolicy<Inner> && !Inner::residual && !Inner::stateful,
                "router::GatingResidual<Inner>: Inner must be a plain router such as router::TopK<router::Softmax> "
                "(write router::BiasBalanced<GatingResidual<...>> for both)");
  using score = typename Inner::score;
  using inner = Inner;
  static constexpr RouterKind kind = Inner::kind;
  static constexpr bool residual = true;
  static constexpr bool biased = false;
  static constexpr bool stateful = false;

  // The inner router's tensors and W_g.
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    Inner::declare_parameters(d, c);
    const std::int64_t n = c.num_experts();
    d.add({"gate_residual", "gate_residual.weight", 1, {n, n}, ParamShard::kReplicated, "", "", 1.0 / std::sqrt(double(n)), true});
  }
  template <class S>
  MOEKIT_HD static S route(const S* logit, int n, int k, bool renormalize, S* prob, int* idx, S* gate, const S* state) {
    return Inner::route(logit, n, k, renormalize, prob, idx, gate, state);
  }
};

}  // namespace moekit::router
