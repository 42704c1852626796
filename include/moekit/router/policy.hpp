#pragma once
// Router policies (docs/design.md §2; docs/architecture.md, "How to add a router"). A router policy is
// a type, and at run time an object the layer makes from its config: the router's options by value
// (trivially copyable, so the CUDA kernels take it as a parameter). It provides
//   score                          the score function (router/score.hpp)
//   options                        its options struct (core/options.hpp; NoOptions when it has none)
//   R(const MoeConfig&)            reads its options and its share of MoeConfig
//   check(cfg)                     throws ConfigError when the config does not ask for this router
//   declare_parameters(d, cfg)     its trainable tensors (core/parameter.hpp's ParamFamily)
//   declare_logits(terms)          how its logits are made from those tensors (LogitTerm below)
//   select(sel, n, idx, state)     one token's selection: the k experts of sel [n] (scores it may
//                                  change: it is scratch) into idx [k]; MOEKIT_HD
//   k, gate_rule()                 top_k, and how the picked scores become gates (router/topk.hpp)
//   capacity_score(logit, prob)    the score capacity drops by (lowest first)
//   list_choices(keys)             the runtime-switch choices it stands for (layer/policy_switch.hpp)
// and, where it has them (router_traits below gives the defaults),
//   stateful, end_step(values, step_counts, cfg), step_update(step_counts, cfg): per-expert state and
//                                  the hook after each optimizer step (router::BiasBalanced)
//   selection_bias                 the state is a per-expert selection bias (expert_bias() API)
//   reads_prev_logits              its logits take the previous MoE layer's (router::GatingResidual).
// A wrapper (GatingResidual, BiasBalanced, GroupLimited, LinearBias) derives from its inner router and
// overrides what it changes, calling the inner router for the rest: its select() transforms the scores
// and then calls Inner::select(). The backends call the outermost router through route_token_choice(),
// so every wrapper of a chain takes part. Adding a router is one header like router/group_limited.hpp
// and, to choose it at run time, one line in layer/policy_switch.hpp.
#include <cmath>
#include <concepts>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/macros.hpp"
#include "moekit/core/options.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/router/expert_choice.hpp"
#include "moekit/router/replay.hpp"
#include "moekit/router/score.hpp"
#include "moekit/router/topk.hpp"

namespace moekit::router {

// One term of the router logits [T, N_E]: input · W^T for a parameter family W (the layer input x, or
// the previous MoE layer's logits), or a family added to every row (a bias). The backends compute the
// terms in order, forward and backward (backend/host/layer_ops.hpp, backend/cuda/layer_ops.cuh).
enum class LogitInput { kX, kPrevLogits, kBias };
struct LogitTerm {
  LogitInput input;
  const char* family;  // the parameter family's key (core/parameter.hpp)
};
using LogitTerms = std::vector<LogitTerm>;

// Top-k router over all experts; the score function gives the scores and P (router/topk.hpp).
template <class Score>
struct TopK {
  static_assert(ScoreFunction<Score>, "router::TopK<Score>: Score must be router::Softmax or router::Sigmoid");
  using score = Score;
  // DeepSeek-V3's and LongCat-Flash's routed_scaling_factor: the gates are multiplied by it. routing:
  // the tokens choose their experts (the default), or the experts their tokens (router/expert_choice.hpp).
  struct Options {
    double routed_scaling_factor = 1.0;
    Routing routing = Routing::kTokenChoice;
    static constexpr auto fields() {
      return std::make_tuple(ConfigField<double, Options>{"routed_scaling_factor", &Options::routed_scaling_factor,
                                                          FieldRule::kFinitePositive},
                             ConfigField<Routing, Options>{"routing", &Options::routing});
    }
    void validate(const MoeConfig& c) const {
      if (routing == Routing::kExpertChoice) check_expert_choice(c);
    }
  };
  using options = Options;

  int k = 1;
  GateRule rule;
  Routing routing = Routing::kTokenChoice;

  TopK() = default;
  explicit TopK(const MoeConfig& c) : TopK(c, read_options<Options>(c)) {}

  static void check(const MoeConfig& c) {
    if (c.router != Score::kind)
      throw ConfigError("router", field_text(c.router), std::string("must match the layer's compile-time policy (") + to_string(Score::kind) + ")");
    if (Score::kind != RouterKind::kSoftmax) require_token_choice(read_options<Options>(c).routing, "the sigmoid score (expert choice takes the softmax over the experts)");
  }
  static void list_choices(std::vector<std::string>&) {}
  // The router weight W_r (logits = x W_r^T).
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    d.add({"router", "gate.weight", 1, {c.num_experts(), c.d_model}, ParamShard::kReplicated, "", "router",
           1.0 / std::sqrt(double(c.d_model)), false});
  }
  static void declare_logits(LogitTerms& t) { t.push_back({LogitInput::kX, "router"}); }

  template <class S>
  MOEKIT_HD void select(S* sel, int n, int* idx, const S* /*state*/) const {
    topk_descending(sel, n, k, idx);
  }
  MOEKIT_HD GateRule gate_rule() const { return rule; }
  template <class S>
  MOEKIT_HD S capacity_score(S logit, S prob) const {
    return router::capacity_score(Score{}, logit, prob);
  }

 private:
  TopK(const MoeConfig& c, const Options& o)
      : k(int(c.top_k)), rule{c.renormalize.value_or(Score::kind == RouterKind::kSigmoid), o.routed_scaling_factor}, routing(o.routing) {}
};

// What a router has beyond the required members, with the defaults of a plain stateless router.
template <class R>
struct router_traits {
  static constexpr bool stateful = [] {
    if constexpr (requires { R::stateful; }) return bool(R::stateful);
    else return false;
  }();
  static constexpr bool selection_bias = [] {
    if constexpr (requires { R::selection_bias; }) return bool(R::selection_bias);
    else return false;
  }();
  static constexpr bool reads_prev_logits = [] {
    if constexpr (requires { R::reads_prev_logits; }) return bool(R::reads_prev_logits);
    else return false;
  }();
};

template <class R>
concept RouterPolicy = requires(const R& r, float* sel, int* idx, const MoeConfig& c, ParamDecls& d, LogitTerms& t,
                                std::vector<std::string>& keys) {
  typename R::score;
  requires ScoreFunction<typename R::score>;
  requires std::is_trivially_copyable_v<R>;
  R(c);
  R::check(c);
  R::declare_parameters(d, c);
  R::declare_logits(t);
  R::list_choices(keys);
  r.select(sel, 1, idx, static_cast<const float*>(nullptr));
  { r.gate_rule() } -> std::convertible_to<GateRule>;
  { r.k } -> std::convertible_to<int>;
  { r.template capacity_score<float>(0.f, 0.f) } -> std::convertible_to<float>;
};

// One token, forward, through the outermost router r (every wrapper's select takes part): scores into
// prob, the selection (sel: scratch of n), the gates as applied, then prob becomes P. Returns the lse.
template <class R, class S>
MOEKIT_HD S route_token_choice(const R& r, const S* logit, int n, S* prob, S* sel, int* idx, S* gate, const S* state) {
  using Score = typename R::score;
  const S lse = token_scores(Score{}, logit, n, prob);
  for (int i = 0; i < n; ++i) sel[i] = prob[i];
  r.select(sel, n, idx, state);
  picked_gates(prob, idx, r.k, r.gate_rule(), gate);
  balance_probs(Score{}, prob, n);
  return lse;
}
// Its backward: dlogit [n] from dgate [k], the balance loss's dprob [n] and the z-loss's zcoef (the
// selection is a constant of the forward). ds: scratch of n.
template <class R, class S>
MOEKIT_HD void route_token_choice_backward(const R& r, const S* logit, int n, const S* prob, const int* idx, const S* gate,
                                           const S* dgate, const S* dprob, S zcoef, S* ds, S* dlogit) {
  token_backward(typename R::score{}, logit, n, r.k, r.gate_rule(), prob, idx, gate, dgate, dprob, zcoef, ds, dlogit);
}

// The backward of a token whose slots the plan lists by token (expert choice, a replayed routing): its
// `count` slots (experts idx, gates, dgate) as a token-choice token with k = count, by the router's
// gate rule (expert choice's: unnormalised, scaled).
template <class R, class S>
MOEKIT_HD void route_by_token_backward(const R& r, const S* logit, int n, int count, const S* prob, const int* idx, const S* gate,
                                       const S* dgate, const S* dprob, S zcoef, S* ds, S* dlogit) {
  token_backward(typename R::score{}, logit, n, count, r.gate_rule(), prob, idx, gate, dgate, dprob, zcoef, ds, dlogit);
}

// MoE++ gating residual (arXiv 2410.07348): logits^j = W^j x^j + W_g^j logits^{j-1}, W_g^j [N_E, N_E].
// The first MoE layer of a model gets no previous logits and uses W x alone. The residual changes the
// logits (a term and a parameter of the layer), not the routing of a token.
template <class Inner>
struct GatingResidual : Inner {
  static_assert(RouterPolicy<Inner> && !router_traits<Inner>::reads_prev_logits && !router_traits<Inner>::stateful,
                "router::GatingResidual<Inner>: Inner must be a stateless router without the residual, such as "
                "router::TopK<router::Softmax> (write router::BiasBalanced<GatingResidual<...>> for both)");
  using inner = Inner;
  using options = NoOptions;
  static constexpr bool reads_prev_logits = true;
  static constexpr const char* choice = "gating_residual";

  GatingResidual() = default;
  explicit GatingResidual(const MoeConfig& c) : Inner(c) {}
  static void check(const MoeConfig& c) {
    Inner::check(c);
    if (!c.gating_residual) throw ConfigError("gating_residual", "false", "must match the layer's compile-time policy (true)");
  }
  static void list_choices(std::vector<std::string>& keys) {
    Inner::list_choices(keys);
    keys.push_back(choice);
  }
  // The inner router's tensors and W_g (fp32: it multiplies the fp32 logits).
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    Inner::declare_parameters(d, c);
    const std::int64_t n = c.num_experts();
    d.add({"gate_residual", "gate_residual.weight", 1, {n, n}, ParamShard::kReplicated, "", "", 1.0 / std::sqrt(double(n)), true});
  }
  static void declare_logits(LogitTerms& t) {
    Inner::declare_logits(t);
    t.push_back({LogitInput::kPrevLogits, "gate_residual"});
  }
};

// Calls f(std::type_identity<P>{}) for the router R and every router it wraps, outermost first.
template <class R, class F>
constexpr void for_each_router_layer(F&& f) {
  f(std::type_identity<R>{});
  if constexpr (requires { typename R::inner; }) for_each_router_layer<typename R::inner>(f);
}

}  // namespace moekit::router
