#pragma once
// AdamW (Loshchilov & Hutter, arXiv 1711.05101) with torch.optim.AdamW's exact order of operations
// (single-tensor path, amsgrad=False, maximize=False), for step t = 1, 2, ...:
//
//   p  *= 1 - lr * weight_decay                      decoupled decay, before the Adam step
//   m  += (1 - beta1) * (g - m)                      torch's lerp form of beta1*m + (1-beta1)*g
//   v   = beta2 * v + (1 - beta2) * g * g
//   p  -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// The moments are kept in T (fp32 for float parameters): the parameters themselves are the master
// weights. The scalars (bias corrections, step size) are computed in double, as torch does in Python.
// Gradient clipping and the learning-rate schedule live beside it (included below).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/train/grad_clip.hpp"
#include "moekit/train/lr_schedule.hpp"

namespace moekit::train {

struct AdamWConfig {  // torch.optim.AdamW's defaults
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;

  void validate() const {
    auto check = [](const char* f, double v, bool ok, const char* rule) {
      if (!ok || !std::isfinite(v)) throw ConfigError(f, moekit::detail::str(v), rule);
    };
    check("lr", lr, lr >= 0.0, "must be finite and >= 0");
    check("beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "must be in [0, 1)");
    check("beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "must be in [0, 1)");
    check("eps", eps, eps >= 0.0, "must be finite and >= 0");
    check("weight_decay", weight_decay, weight_decay >= 0.0, "must be finite and >= 0");
  }
};

template <class T = float>
class AdamW {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "train::AdamW<T>: T must be float or double");

 public:
  using DecayRule = std::function<bool(const Parameter<T>&)>;

  // `decays` picks the parameters that get weight decay; the default decays all of them, as one
  // torch parameter group does. (A common choice: decay matrices only, `p.shape.size() >= 2`.)
  explicit AdamW(std::vector<Parameter<T>> params, AdamWConfig cfg = {}, DecayRule decays = {})
      : params_(std::move(params)), cfg_(cfg) {
    cfg_.validate();
    for (const auto& p : params_) {
      if (p.numel() > 0 && (p.value == nullptr || p.grad == nullptr))
        throw ShapeError("parameter " + p.name + " has a null value or grad pointer");
      m_.emplace_back(p.numel(), T(0));
      v_.emplace_back(p.numel(), T(0));
      decay_.push_back(!decays || decays(p));
    }
  }

  const AdamWConfig& config() const { return cfg_; }
  std::vector<Parameter<T>>& parameters() { return params_; }
  const std::vector<Parameter<T>>& parameters() const { return params_; }
  std::int64_t steps_taken() const { return t_; }
  bool decays(std::size_t i) const { return decay_.at(i); }

  // First and second moments of parameter i (for checkpoints and exact resume).
  std::vector<T>& exp_avg(std::size_t i) { return m_.at(i); }
  std::vector<T>& exp_avg_sq(std::size_t i) { return v_.at(i); }
  const std::vector<T>& exp_avg(std::size_t i) const { return m_.at(i); }
  const std::vector<T>& exp_avg_sq(std::size_t i) const { return v_.at(i); }
  void set_steps_taken(std::int64_t t) {
    if (t < 0) throw ConfigError("steps_taken", std::to_string(t), "must be >= 0");
    t_ = t;
  }

  void zero_grad() {
    for (auto& p : params_) std::fill_n(p.grad, p.numel(), T(0));
  }

  // One update with learning rate lr (the schedule's value for this step).
  void step(double lr) {
    if (!(lr >= 0.0) || !std::isfinite(lr)) throw ConfigError("lr", moekit::detail::str(lr), "must be finite and >= 0");
    ++t_;
    const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t_));
    const double bc2 = 1.0 - std::pow(cfg_.beta2, double(t_));
    const T step_size = T(lr / bc1);
    const T bc2_sqrt = T(std::sqrt(bc2));
    const T one_minus_b1 = T(1.0 - cfg_.beta1), b2 = T(cfg_.beta2), one_minus_b2 = T(1.0 - cfg_.beta2);
    const T eps = T(cfg_.eps);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const std::int64_t n = params_[i].numel();
      T* p = params_[i].value;
      const T* g = params_[i].grad;
      T* m = m_[i].data();
      T* v = v_[i].data();
      const T shrink = T(1.0 - lr * (decay_[i] ? cfg_.weight_decay : 0.0));
#pragma omp parallel for schedule(static) if (n > (1 << 15))
      for (std::int64_t j = 0; j < n; ++j) {
        p[j] *= shrink;
        m[j] += one_minus_b1 * (g[j] - m[j]);
        v[j] = b2 * v[j] + one_minus_b2 * g[j] * g[j];
        p[j] -= step_size * m[j] / (std::sqrt(v[j]) / bc2_sqrt + eps);
      }
    }
  }
  void step() { step(cfg_.lr); }

 private:
  std::vector<Parameter<T>> params_;
  AdamWConfig cfg_;
  std::vector<std::vector<T>> m_, v_;
  std::vector<bool> decay_;
  std::int64_t t_ = 0;
};

}  // namespace moekit::train
