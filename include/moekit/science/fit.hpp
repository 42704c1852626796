#pragma once
// Fitting the scaling law (scaling_law.hpp) to measured runs (N, D, G, loss), as Krajewski et al. and
// Chinchilla do: minimise Σ Huber_δ(log L̂(N_i, D_i, G_i) - log L_i) with δ = 0.1 by L-BFGS (NLopt's
// LD_LBFGS, analytic gradient) from a grid of initial points, and keep the best. The coefficients that
// scale are fitted as logarithms (a = e^la, ...), which keeps them positive and the problem well scaled.
//
// With runs at a single granularity g and a are not separable (only g/G^γ + a is seen) and γ has no
// data: the fit then takes the dense form (g = γ = 0) and says so (FitResult::dense). Needs NLopt
// (Debian libnlopt-cxx-dev), like science/planner.hpp: link the CMake target moekit::science (moekit::moekit
// + NLopt), not moekit::moekit alone.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include <nlopt.hpp>

#include "moekit/core/error.hpp"
#include "moekit/science/scaling_law.hpp"

namespace moekit::science {

struct Run {
  double total_params = 0;  // N, non-embedding
  double tokens = 0;        // D
  double granularity = 1;   // G
  double loss = 0;          // nats per token (any fixed unit: the law is fitted to whatever is given)
};

struct FitOptions {
  double huber_delta = 0.1;
  bool dense = false;  // fit the dense form (g = γ = 0) even when the runs have several G
};

struct FitResult {
  ScalingLaw law;
  double objective = 0;   // Σ Huber of the log residuals at the optimum
  double rms_log_residual = 0;
  bool dense = false;     // the dense form was fitted (options, or a single granularity)
  std::size_t starts = 0;  // initial points tried
};

namespace detail {

inline double huber(double r, double delta) { return std::abs(r) <= delta ? 0.5 * r * r : delta * (std::abs(r) - 0.5 * delta); }
inline double huber_slope(double r, double delta) { return std::clamp(r, -delta, delta); }

// θ = (la, α, lb, β, lg, γ, lc); the dense form uses the first four and lc (lg = -inf, γ = 0).
struct LawObjective {
  const std::vector<Run>& runs;
  double delta;
  bool dense;
  static constexpr std::size_t kFull = 7, kDense = 5;

  static ScalingLaw law(const std::vector<double>& t, bool dense) {
    ScalingLaw l;
    l.a = std::exp(t[0]), l.alpha = t[1], l.b = std::exp(t[2]), l.beta = t[3];
    if (dense) l.g = 0, l.gamma = 0, l.c = std::exp(t[4]);
    else l.g = std::exp(t[4]), l.gamma = t[5], l.c = std::exp(t[6]);
    return l;
  }
  double operator()(const std::vector<double>& t, std::vector<double>& grad) const {
    const ScalingLaw l = law(t, dense);
    if (!grad.empty()) std::fill(grad.begin(), grad.end(), 0.0);
    double sum = 0;
    for (const Run& r : runs) {
      const double lnN = std::log(r.total_params), lnD = std::log(r.tokens), lnG = std::log(r.granularity);
      const double nN = std::exp(-l.alpha * lnN), nD = std::exp(-l.beta * lnD), gG = dense ? 0.0 : l.g * std::exp(-l.gamma * lnG);
      const double pred = l.c + (gG + l.a) * nN + l.b * nD;
      const double res = std::log(pred) - std::log(r.loss);
      sum += huber(res, delta);
      if (grad.empty()) continue;
      const double w = huber_slope(res, delta) / pred;  // d huber / d pred
      grad[0] += w * l.a * nN;
      grad[1] += w * -lnN * (gG + l.a) * nN;
      grad[2] += w * l.b * nD;
      grad[3] += w * -lnD * l.b * nD;
      if (dense) {
        grad[4] += w * l.c;
      } else {
        grad[4] += w * gG * nN;
        grad[5] += w * -lnG * gG * nN;
        grad[6] += w * l.c;
      }
    }
    return sum;
  }
  static double nlopt_objective(const std::vector<double>& t, std::vector<double>& grad, void* self) {
    return (*static_cast<const LawObjective*>(self))(t, grad);
  }
};

}  // namespace detail

inline void check_runs(const std::vector<Run>& runs, bool dense) {
  const std::size_t need = dense ? detail::LawObjective::kDense + 1 : detail::LawObjective::kFull + 1;
  if (runs.size() < need)
    throw ConfigError("runs", std::to_string(runs.size()),
                      "too few to fit " + std::to_string(need - 1) + " coefficients (need at least " + std::to_string(need) + ")");
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    const double v[] = {r.total_params, r.tokens, r.granularity, r.loss};
    const char* names[] = {"total_params", "tokens", "granularity", "loss"};
    for (int k = 0; k < 4; ++k)
      if (!std::isfinite(v[k]) || !(v[k] > 0) || (k == 2 && v[k] < 1))
        throw ConfigError("runs[" + std::to_string(i) + "]." + names[k], std::to_string(v[k]),
                          k == 2 ? "must be finite and >= 1" : "must be finite and > 0");
  }
}

inline FitResult fit_scaling_law(const std::vector<Run>& runs, const FitOptions& o = {}) {
  if (!(o.huber_delta > 0)) throw ConfigError("huber_delta", std::to_string(o.huber_delta), "must be > 0");
  std::set<double> gs;
  for (const Run& r : runs) gs.insert(r.granularity);
  const bool dense = o.dense || gs.size() < 2;
  check_runs(runs, dense);
  detail::LawObjective obj{runs, o.huber_delta, dense};
  const std::size_t n = dense ? detail::LawObjective::kDense : detail::LawObjective::kFull;
  // Bounds keep exp() finite and the exponents meaningful.
  std::vector<double> lo = {-10, 0, -10, 0, -10, 0, -10}, hi = {20, 2, 20, 2, 20, 3, 3};
  if (dense) lo = {-10, 0, -10, 0, -10}, hi = {20, 2, 20, 2, 3};
  nlopt::opt opt(nlopt::LD_LBFGS, unsigned(n));
  opt.set_lower_bounds(lo);
  opt.set_upper_bounds(hi);
  opt.set_min_objective(&detail::LawObjective::nlopt_objective, &obj);
  opt.set_ftol_rel(1e-14);
  opt.set_xtol_rel(1e-10);
  opt.set_maxeval(4000);

  FitResult best;
  best.objective = std::numeric_limits<double>::infinity();
  const std::array<double, 3> log_scale = {0.0, 2.5, 5.0};
  const std::array<double, 2> exponent = {0.1, 0.4}, gamma = {0.3, 0.9}, log_c = {-1.0, 0.5}, log_g = {-1.0, 1.5};
  std::vector<std::vector<double>> starts;
  for (double la : log_scale)
    for (double al : exponent)
      for (double lb : log_scale)
        for (double be : exponent)
          for (double lc : log_c) {
            if (dense) starts.push_back({la, al, lb, be, lc});
            else
              for (double lg : log_g)
                for (double ga : gamma) starts.push_back({la, al, lb, be, lg, ga, lc});
          }
  for (auto& x : starts) {
    double f = 0;
    try {
      opt.optimize(x, f);
    } catch (const nlopt::roundoff_limited&) {  // as close as doubles allow: x holds the best point
      std::vector<double> none;
      f = obj(x, none);
    } catch (const std::runtime_error&) {  // NLopt gave up from this start (a generic failure); next one
      continue;
    }
    if (std::isfinite(f) && f < best.objective) best.objective = f, best.law = detail::LawObjective::law(x, dense);
  }
  if (!std::isfinite(best.objective)) throw NumericError("fit_scaling_law: no initial point converged");
  best.dense = dense, best.starts = starts.size();
  double ss = 0;
  for (const Run& r : runs) {
    const double pred = dense ? best.law.dense_loss(r.total_params, r.tokens) : best.law.loss(r.total_params, r.tokens, r.granularity);
    ss += std::pow(std::log(pred) - std::log(r.loss), 2);
  }
  best.rms_log_residual = std::sqrt(ss / double(runs.size()));
  return best;
}

}  // namespace moekit::science
