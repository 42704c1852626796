#pragma once
// The compute-optimal fine-grained MoE for a FLOP budget (Krajewski et al., arXiv 2402.07871, §6;
// docs/design.md §8): for each granularity G = 1, 2, 4, ... up to a limit, the depth n_blocks whose model
// (d_model = 64 n_blocks, scaling_law.hpp) trained on the tokens the budget buys (Eq. 10) has the
// lowest predicted loss (Eq. 9). With the shape tied to the depth the search is one-dimensional, as in
// the paper; NLopt's BOBYQA minimises it over log n_blocks from a grid of starting points (the paper
// uses Brent's method; both need only the loss along the constraint).
//
// Also the FLOPs a dense model needs for the same predicted loss, the paper's compute multiplier (its
// Fig. 1b), under a dense law of its own (the paper's dense fit by default): the dense optimum of L = c + a/N^α + b/D^β under F = 6 N D has the closed form
// N* = (α a / (β b))^(1/(α+β)) (F/6)^(β/(α+β)), so its loss is c + K F^(-αβ/(α+β)) and inverts exactly.
//
// Needs NLopt (Debian libnlopt-cxx-dev), an optional dependency of moekit, like science/fit.hpp: link the
// CMake target moekit::science (moekit::moekit + NLopt), not moekit::moekit alone.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <nlopt.hpp>

#include "moekit/core/error.hpp"
#include "moekit/science/scaling_law.hpp"

namespace moekit::science {

struct PlanPoint {
  double granularity = 1;
  LawShape shape;
  double tokens = 0, flops = 0, loss = 0;
  bool at_bound = false;  // the optimum sits on the search's depth limit: widen it (PlanOptions)
};

struct Plan {
  double flops = 0, experts = 0;
  std::vector<PlanPoint> points;  // one per G, in G order
  std::size_t best = 0, runner_up = 0;  // indices into points (runner_up == best when only one G)
  ScalingLaw dense_law;                  // the law the dense comparison used
  double dense_flops_for_same_loss = 0;  // +inf when the best loss is at or below the dense law's c
  const PlanPoint& optimum() const { return points[best]; }
};

struct PlanOptions {
  std::int64_t max_granularity = 64;  // G = 1, 2, 4, ..., at most this
  double min_blocks = 0.25, max_blocks = 1e5;  // the depth's search range (continuous)
  double c_f = 6.0, c_r = 14.0;
};

// Dense model of the law's family: the compute-optimal loss for F FLOPs (F = 6 N D), and its inverse.
inline double dense_optimal_loss(const ScalingLaw& law, double F) {
  if (!std::isfinite(F) || !(F > 0)) throw ConfigError("flops", std::to_string(F), "must be finite and > 0");
  const double s = law.alpha + law.beta;
  const double N = std::pow(law.alpha * law.a / (law.beta * law.b), 1.0 / s) * std::pow(F / 6.0, law.beta / s);
  return law.dense_loss(N, F / (6.0 * N));
}
inline double dense_flops_for_loss(const ScalingLaw& law, double loss) {
  if (!std::isfinite(loss)) throw ConfigError("loss", std::to_string(loss), "must be finite");
  if (loss <= law.c) return std::numeric_limits<double>::infinity();  // below the irreducible loss
  const double F0 = 1e20, p = law.alpha * law.beta / (law.alpha + law.beta);
  return F0 * std::pow((dense_optimal_loss(law, F0) - law.c) / (loss - law.c), 1.0 / p);
}

namespace detail {
struct AlongBudget {  // the loss along the FLOP constraint, as a function of log n_blocks
  const ScalingLaw& law;
  double F, E, G, c_f, c_r;
  double operator()(double log_blocks) const {
    const LawShape s = moe_shape(std::exp(log_blocks), E);
    return law.loss(s.total_params, moe_tokens_for_flops(s, E, G, F, c_f, c_r), G);
  }
  static double nlopt_objective(const std::vector<double>& x, std::vector<double>&, void* self) {
    return (*static_cast<const AlongBudget*>(self))(x[0]);
  }
};
}  // namespace detail

// The compute-optimal point at one granularity.
inline PlanPoint plan_at_granularity(const ScalingLaw& law, double F, double experts, double G, const PlanOptions& o = {}) {
  law.check();
  if (!std::isfinite(F) || !(F > 0)) throw ConfigError("flops", std::to_string(F), "must be finite and > 0");
  if (!std::isfinite(experts) || !(experts >= 1)) throw ConfigError("experts", std::to_string(experts), "must be finite and >= 1");
  if (!(o.min_blocks > 0) || !(o.max_blocks > o.min_blocks))
    throw ConfigError("min_blocks/max_blocks", std::to_string(o.min_blocks) + "/" + std::to_string(o.max_blocks), "need 0 < min < max");
  detail::AlongBudget along{law, F, experts, G, o.c_f, o.c_r};
  const double lo = std::log(o.min_blocks), hi = std::log(o.max_blocks);
  nlopt::opt opt(nlopt::LN_BOBYQA, 1);
  opt.set_lower_bounds(std::vector<double>{lo});
  opt.set_upper_bounds(std::vector<double>{hi});
  opt.set_min_objective(&detail::AlongBudget::nlopt_objective, &along);
  opt.set_xtol_abs(1e-12);
  opt.set_maxeval(2000);
  double best_x = lo, best_f = std::numeric_limits<double>::infinity();
  constexpr int kStarts = 8;  // the loss along the constraint is smooth; several starts guard a flat end
  for (int i = 0; i < kStarts; ++i) {
    std::vector<double> x{lo + (hi - lo) * (i + 0.5) / kStarts};
    double f = 0;
    try {
      opt.optimize(x, f);
    } catch (const nlopt::roundoff_limited&) {  // converged as far as doubles allow: x is still the best
      f = along(x[0]);
    }
    if (f < best_f) best_f = f, best_x = x[0];
  }
  PlanPoint p;
  p.granularity = G;
  p.shape = moe_shape(std::exp(best_x), experts);
  p.tokens = moe_tokens_for_flops(p.shape, experts, G, F, o.c_f, o.c_r);
  p.flops = moe_training_flops(p.shape, experts, G, p.tokens, o.c_f, o.c_r);
  p.loss = law.loss(p.shape.total_params, p.tokens, G);
  p.at_bound = best_x - lo < 1e-6 || hi - best_x < 1e-6;
  return p;
}

// Every G in powers of two up to max_granularity, the best and the runner-up, and the FLOPs a dense
// model needs under `dense_law` for the best's loss.
inline Plan plan(const ScalingLaw& law, double F, double experts, const PlanOptions& o = {},
                 const ScalingLaw& dense_law = ScalingLaw::paper_dense()) {
  dense_law.check();
  if (o.max_granularity < 1)
    throw ConfigError("max_granularity", std::to_string(o.max_granularity), "must be >= 1 (G runs over 1, 2, 4, ... up to it)");
  Plan p;
  p.flops = F, p.experts = experts;
  for (std::int64_t G = 1; G <= o.max_granularity; G *= 2) p.points.push_back(plan_at_granularity(law, F, experts, double(G), o));
  for (std::size_t i = 1; i < p.points.size(); ++i)
    if (p.points[i].loss < p.points[p.best].loss) p.best = i;
  p.runner_up = p.best;
  for (std::size_t i = 0; i < p.points.size(); ++i)
    if (i != p.best && (p.runner_up == p.best || p.points[i].loss < p.points[p.runner_up].loss)) p.runner_up = i;
  p.dense_law = dense_law;
  p.dense_flops_for_same_loss = dense_flops_for_loss(dense_law, p.optimum().loss);
  return p;
}

}  // namespace moekit::science
