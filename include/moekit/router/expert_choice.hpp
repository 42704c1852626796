#pragma once
// Expert-choice routing (Zhou et al., arXiv 2202.09368; docs/design.md §2): the experts pick the tokens.
// S = softmax over the experts of the logits, [T, N_E]; expert e takes the C_e tokens with the largest
// S[t, e] (ties to the lower token index); a token gets 0..N_E experts and
//   y_t = Σ over the experts e that took t of c · S[t, e] · E_e(x_t)      (c: routed_scaling_factor).
// C_e is §4's capacity of e's kind for T tokens, capped at T: ceil(capacity_factor · k · T / N_E) without
// MoE++ zero-computation experts, their τ-weighted C_FFN / C_ZC with them. The selection is a constant of
// the forward, so the backward is the token-choice one over the token's own slots (router/policy.hpp's
// route_by_token_backward): ∂L/∂S[t, e] = c · dy_t · E_e(x_t) for the pairs taken, then the softmax's
// backward (and the z-loss's, unchanged).
// The load is balanced by construction: a positive lbl_coef is a ConfigError, as are the routers that
// change the selection (BiasBalanced, GroupLimited), the sigmoid score, renormalised gates and the
// balance loss's sequence scope. In a causal language model a token's routing then depends on the other
// tokens of the batch, later ones included: fine for training and scoring, not for generation.
//
// It is an option of the token-choice routers (`routing`, router::TopK's options), so the runtime
// switch gains no rows; the plan it makes is by token (layer/routing_plan.hpp's SlotLayout::by_token),
// which dispatch, the experts and combine already read. Under expert parallelism each rank chooses
// over its own T tokens, then dispatches as for token choice.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moekit/balance/loss.hpp"
#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/macros.hpp"
#include "moekit/router/topk.hpp"

namespace moekit {

enum class Routing { kTokenChoice, kExpertChoice };
inline const char* to_string(Routing r) { return r == Routing::kTokenChoice ? "token_choice" : "expert_choice"; }
template <>
struct EnumValues<Routing> {
  static constexpr Routing all[] = {Routing::kTokenChoice, Routing::kExpertChoice};
};

namespace router {

// The routing a router object was made with (a router without the option routes by token).
template <class R>
Routing routing_of(const R& r) {
  if constexpr (requires { r.routing; }) return r.routing;
  else return Routing::kTokenChoice;
}

// Tokens each FFN and each zero-computation expert takes from T tokens (capacity_factor > 0 is a rule).
inline balance::Capacities expert_choice_capacities(const MoeConfig& c, std::int64_t tokens) {
  const balance::Capacities caps =
      balance::expert_capacities(c.capacity_factor, c.tau, c.top_k, tokens, c.num_ffn_experts, c.num_zc_experts());
  return {std::min(caps.ffn, tokens), std::min(caps.zc, tokens)};
}
// Slots of a forward of T tokens: T·k for token choice; Σ_e C_e for expert choice. Slots grow with T,
// so this is also the most slots of any forward of up to T tokens (the slot buffers' size).
inline std::int64_t routing_slots(const MoeConfig& c, Routing r, std::int64_t tokens) {
  if (r == Routing::kTokenChoice) return tokens * c.top_k;
  const balance::Capacities caps = expert_choice_capacities(c, tokens);
  return caps.ffn * c.num_ffn_experts + caps.zc * c.num_zc_experts();
}

// The rules of expert choice, for a config that asks for it (TopK's options call this).
inline void check_expert_choice(const MoeConfig& c) {
  if (!(c.capacity_factor > 0.0))
    throw ConfigError("capacity_factor", std::to_string(c.capacity_factor), "must be > 0 with \"routing\": \"expert_choice\" (it sets the tokens each expert takes)");
  if (c.lbl_coef > 0.0)
    throw ConfigError("lbl_coef", std::to_string(c.lbl_coef), "must be 0 with \"routing\": \"expert_choice\" (the load is balanced by construction)");
  if (c.renormalize.value_or(false))
    throw ConfigError("renormalize", "true", "does not apply to \"routing\": \"expert_choice\" (a token's gates are its softmax scores)");
}
// What a router that changes the token-choice selection says when asked for expert choice.
inline void require_token_choice(Routing r, const char* who) {
  if (r == Routing::kExpertChoice)
    throw ConfigError("routing", "\"expert_choice\"", std::string("cannot combine with ") + who + " (it changes the token-choice selection)");
}

// The selection on the host, from the scores prob [T, N_E] (softmax, rows of non-finite tokens zeroed):
// expert e takes its C_e best tokens (caps: FFN experts [0, ffn), then the zero-computation ones), ties to
// the lower token. Writes the by-token plan: first [T + 1] (token t's slots are [first[t], first[t+1]),
// in expert order), token_of, expert [slots] and gate [slots] = scale · prob[t, e]; `taken` is scratch
// [T, N_E]. Returns the slots.
template <class S>
std::int64_t expert_choice_select(const S* prob, std::int64_t tokens, std::int64_t experts, std::int64_t ffn_experts,
                                  const balance::Capacities& caps, double scale, int* first, int* token_of, int* expert, S* gate,
                                  std::vector<unsigned char>& taken) {
  using I64 = std::int64_t;
  taken.assign(std::size_t(tokens * experts), 0);  // the caller's buffer: no allocation once it is large enough
#pragma omp parallel if (tokens * experts >= 32768)
  {
    std::vector<int> order(static_cast<std::size_t>(tokens));
#pragma omp for schedule(dynamic)
    for (I64 e = 0; e < experts; ++e) {
      const I64 cap = e < ffn_experts ? caps.ffn : caps.zc;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + cap, order.end(), [&](int a, int b) {
        const S pa = prob[I64(a) * experts + e], pb = prob[I64(b) * experts + e];
        return pa > pb || (pa == pb && a < b);
      });
      for (I64 r = 0; r < cap; ++r) taken[std::size_t(I64(order[std::size_t(r)]) * experts + e)] = 1;
    }
  }
  I64 s = 0;
  for (I64 t = 0; t < tokens; ++t) {
    first[t] = int(s);
    for (I64 e = 0; e < experts; ++e)
      if (taken[std::size_t(t * experts + e)]) {
        token_of[s] = int(t), expert[s] = int(e), gate[s] = S(scale) * prob[t * experts + e];
        ++s;
      }
  }
  first[tokens] = int(s);
  return s;
}

}  // namespace router
}  // namespace moekit
