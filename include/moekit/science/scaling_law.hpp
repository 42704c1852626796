#pragma once
// The fine-grained MoE scaling law of Krajewski et al., "Scaling Laws for Fine-Grained Mixture of
// Experts" (arXiv 2402.07871), docs/design.md §8:
//
//   Eq. 9    L(N, D, G) = c + (g / G^γ + a) / N^α + b / D^β
//   dense    L(N, D)    = c + a / N^α + b / D^β
//
// The dense form is fitted separately (the paper's Table 1 has a dense row with its own a, α, b, β).
// N: total non-embedding parameters, D: training tokens, G = d_ff / d_expert: granularity. The paper's
// models tie their shape to the depth, d_model = 64 · n_blocks, with E experts (the expansion rate: E
// full-size FFNs, split G ways into E·G experts of d_ff / G, top-G of them per token):
//   total  N = d_model² (8E + 4) n_blocks,   active 12 d_model² n_blocks,
//   Eq. 10 F = (12 d_model² c_f + d_model E G c_r) · D · n_blocks,  c_f = 6, c_r = 14.
// A dense model of that shape has N = 12 d_model² n_blocks and F = 6 N D (no router).
//
// Host only, no dependency. Fitting the coefficients (science/fit.hpp) and the compute-optimal planner
// (science/planner.hpp) use NLopt (CMake target moekit::science).
#include <cmath>
#include <string>

#include "moekit/core/error.hpp"

namespace moekit::science {

struct ScalingLaw {
  // The paper's fit for E = 64 (its Table 1 / Eq. 9).
  double a = 18.1, alpha = 0.115, b = 30.8, beta = 0.147, g = 2.1, gamma = 0.58, c = 0.47;

  static ScalingLaw paper() { return {}; }
  // The paper's dense Transformers (Table 1, Eq. 1): their own a, α, b, β; the same c; no G term.
  static ScalingLaw paper_dense() {
    ScalingLaw l;
    l.a = 16.3, l.alpha = 0.126, l.b = 26.7, l.beta = 0.127, l.g = 0, l.gamma = 0, l.c = 0.47;
    return l;
  }
  // This law without its G term (a dense law when no dense fit is at hand).
  ScalingLaw without_granularity() const {
    ScalingLaw l = *this;
    l.g = 0, l.gamma = 0;
    return l;
  }

  // Eq. 9. N, D > 0, G >= 1.
  double loss(double N, double D, double G) const {
    check_point(N, D, G);
    return c + (g / std::pow(G, gamma) + a) / std::pow(N, alpha) + b / std::pow(D, beta);
  }
  double dense_loss(double N, double D) const {
    check_point(N, D, 1.0);
    return c + a / std::pow(N, alpha) + b / std::pow(D, beta);
  }

  // Every coefficient finite and > 0 (g may be 0: the dense form).
  void check() const {
    const struct {
      const char* name;
      double v;
      bool zero_ok;
    } k[] = {{"a", a, false}, {"alpha", alpha, false}, {"b", b, false}, {"beta", beta, false},
             {"g", g, true},  {"gamma", gamma, true},  {"c", c, true}};
    for (const auto& e : k)
      if (!std::isfinite(e.v) || e.v < 0 || (!e.zero_ok && e.v == 0))
        throw ConfigError(e.name, std::to_string(e.v), e.zero_ok ? "must be finite and >= 0" : "must be finite and > 0");
  }

 private:
  static void check_point(double N, double D, double G) {
    if (!std::isfinite(N) || !(N > 0)) throw ConfigError("N", std::to_string(N), "must be finite and > 0 (parameters)");
    if (!std::isfinite(D) || !(D > 0)) throw ConfigError("D", std::to_string(D), "must be finite and > 0 (tokens)");
    if (!std::isfinite(G) || !(G >= 1)) throw ConfigError("G", std::to_string(G), "must be finite and >= 1 (granularity)");
  }
};

// The paper's shape for a depth (n_blocks may be fractional: the planner works in a continuum and the
// caller rounds).
struct LawShape {
  double n_blocks = 0, d_model = 0;
  double total_params = 0;   // N, non-embedding
  double active_params = 0;  // per token
};

inline LawShape moe_shape(double n_blocks, double experts) {
  if (!std::isfinite(n_blocks) || !(n_blocks > 0)) throw ConfigError("n_blocks", std::to_string(n_blocks), "must be finite and > 0");
  if (!std::isfinite(experts) || !(experts >= 1)) throw ConfigError("experts", std::to_string(experts), "must be finite and >= 1");
  const double d = 64.0 * n_blocks;
  return {n_blocks, d, d * d * (8.0 * experts + 4.0) * n_blocks, 12.0 * d * d * n_blocks};
}
inline LawShape dense_shape(double n_blocks) {
  LawShape s = moe_shape(n_blocks, 1.0);
  s.total_params = s.active_params;
  return s;
}

// Eq. 10: training FLOPs of D tokens through the MoE model of `shape` at granularity G.
inline double moe_training_flops(const LawShape& shape, double experts, double G, double D, double c_f = 6.0, double c_r = 14.0) {
  if (!std::isfinite(D) || !(D > 0)) throw ConfigError("D", std::to_string(D), "must be finite and > 0 (tokens)");
  if (!std::isfinite(G) || !(G >= 1)) throw ConfigError("G", std::to_string(G), "must be finite and >= 1 (granularity)");
  const double d = shape.d_model;
  return (12.0 * d * d * c_f + d * experts * G * c_r) * D * shape.n_blocks;
}
// Tokens a budget of F FLOPs buys at that shape and G (Eq. 10 solved for D).
inline double moe_tokens_for_flops(const LawShape& shape, double experts, double G, double F, double c_f = 6.0, double c_r = 14.0) {
  if (!std::isfinite(F) || !(F > 0)) throw ConfigError("flops", std::to_string(F), "must be finite and > 0");
  return F / moe_training_flops(shape, experts, G, 1.0, c_f, c_r);
}

}  // namespace moekit::science
