#pragma once
// Parameters that the host optimizer does not hold: a group keeps its values, gradients and AdamW
// moments where they live (a CUDA layer's flat device buffers: train/cuda_parameter_group.cuh) and
// runs the optimizer's three per-step operations there, so nothing is copied to the host but the
// squared-norm sums. The Trainer (train/trainer.hpp) folds every group into the global gradient norm
// (by shard kind, as the host parameters), scales the group's gradients by the same clipping factor,
// and steps it with the same AdamW config and step count.
//
// HostParameterGroup is the same contract over host Parameters (AdamW's arithmetic, train/adamw.hpp):
// what a group must do, and the oracle of the device groups.
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/train/adamw.hpp"

namespace moekit::train {

class ParameterGroup {
 public:
  virtual ~ParameterGroup() = default;
  // Σ grad² of the replicated parameters and of the expert slices (Parameter::shard). Throws
  // NumericError when a sum is not finite.
  virtual void grad_squares(double& replicated, double& expert_slices) = 0;
  virtual void scale_grads(double factor) = 0;
  // One AdamW update with learning rate lr (after scale_grads); the group counts its own steps.
  virtual void step(double lr) = 0;
  virtual void zero_grad() = 0;
};

// The contract on host memory: AdamW<float> over the group's parameters.
class HostParameterGroup final : public ParameterGroup {
 public:
  HostParameterGroup(std::vector<Parameter<float>> params, AdamWConfig cfg, AdamW<float>::DecayRule decays = {})
      : opt_(std::move(params), cfg, std::move(decays)) {}
  void grad_squares(double& replicated, double& expert_slices) override {
    replicated = expert_slices = 0.0;
    for (const auto& p : opt_.parameters()) {
      const double s = detail::sum_squares(p.grad, p.numel());
      if (!std::isfinite(s)) throw NumericError("gradient of " + p.name + " is not finite");
      (p.expert_slice() ? expert_slices : replicated) += s;
    }
  }
  void scale_grads(double factor) override {
    for (auto& p : opt_.parameters())
      for (std::int64_t i = 0; i < p.numel(); ++i) p.grad[i] = float(double(p.grad[i]) * factor);
  }
  void step(double lr) override { opt_.step(lr); }
  void zero_grad() override { opt_.zero_grad(); }
  AdamW<float>& optimizer() { return opt_; }

 private:
  AdamW<float> opt_;
};

}  // namespace moekit::train
