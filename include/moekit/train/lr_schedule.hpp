#pragma once
// Learning-rate schedule: linear warmup, then cosine decay to min_lr (GPT-3 / llm.c):
//   step < warmup:            lr = max_lr * (step + 1) / warmup
//   warmup <= step < total:   lr = min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))
//   step >= total:            lr = min_lr
// `step` is the 0-based index of the optimizer step about to run. at_progress(f) is the same schedule at
// the fraction f of its length (a run under a wall-clock budget: f = time spent / budget).
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>

#include "moekit/core/error.hpp"

namespace moekit::train {

struct CosineSchedule {
  double max_lr = 1e-3;
  double min_lr = 0.0;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;

  void validate() const {
    if (!(max_lr >= 0.0) || !std::isfinite(max_lr))
      throw ConfigError("max_lr", moekit::detail::str(max_lr), "must be finite and >= 0");
    if (!(min_lr >= 0.0) || min_lr > max_lr)
      throw ConfigError("min_lr", moekit::detail::str(min_lr), "must be in [0, max_lr]");
    if (warmup_steps < 0) throw ConfigError("warmup_steps", std::to_string(warmup_steps), "must be >= 0");
    if (total_steps < warmup_steps)
      throw ConfigError("total_steps", std::to_string(total_steps), "must be >= warmup_steps");
  }

  double operator()(std::int64_t step) const {
    if (step < warmup_steps) return max_lr * double(step + 1) / double(warmup_steps);
    if (step >= total_steps) return min_lr;
    const double ratio = double(step - warmup_steps) / double(total_steps - warmup_steps);
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * ratio));
  }
  // The step at floor(f * total_steps); f >= 1 gives min_lr (f < 0 counts as 0).
  double at_progress(double f) const {
    if (!(f > 0.0)) return (*this)(0);
    if (f >= 1.0) return min_lr;
    return (*this)(std::int64_t(std::floor(f * double(total_steps))));
  }
};

}  // namespace moekit::train
