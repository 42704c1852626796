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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moekit/core/bf16.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/train/adamw.hpp"

namespace moekit::train {

class ParameterGroup {
 public:
  virtual ~ParameterGroup() = default;
  // Σ grad² of the group's parameters by shard kind (core/parameter.hpp NormSquares: replicated, expert
  // slices, tensor slices), added into sq. Throws NumericError when a sum is not finite.
  virtual void grad_squares(NormSquares& sq) = 0;
  virtual void scale_grads(double factor) = 0;
  // One AdamW update with learning rate lr (after scale_grads); the group counts its own steps.
  virtual void step(double lr) = 0;
  virtual void zero_grad() = 0;

  // Checkpoints (train/trainer_checkpoint.hpp). The parameters (names, shapes, shards; their pointers
  // may be device pointers), and the prefix a checkpoint puts before their names (a model's
  // "blocks.0.moe."), so that every tensor is named as the host model would name it.
  virtual std::vector<Parameter<float>> checkpoint_parameters() const = 0;
  // Parameter i's fp32 value (a bf16 one's fp32 master), m and v, to or from host buffers of numel()
  // floats each. Loading a bf16 parameter writes its master and the master rounded to the value.
  virtual void save_state(std::size_t i, float* value, float* m, float* v) const = 0;
  virtual void load_state(std::size_t i, const float* value, const float* m, const float* v) = 0;
  virtual std::int64_t steps_taken() const = 0;
  virtual void set_steps_taken(std::int64_t t) = 0;
  void set_checkpoint_prefix(std::string prefix) { prefix_ = std::move(prefix); }
  const std::string& checkpoint_prefix() const { return prefix_; }

 private:
  std::string prefix_;
};

// The contract on host memory: AdamW<float> over the group's parameters. bf16 values
// (backend::Host<bf16>'s parameters, fp32 gradients) get an fp32 master copy in the group, made from
// the values when the group is made: AdamW updates the masters and the step writes them rounded to
// the values, so updates below bf16's resolution accumulate instead of vanishing (as
// backend::cuda::AdamWGroup). Whoever writes the values behind the group's back calls reload_masters().
class HostParameterGroup final : public ParameterGroup {
 public:
  HostParameterGroup(std::vector<Parameter<float>> params, AdamWConfig cfg, AdamW<float>::DecayRule decays = {})
      : opt_(std::move(params), cfg, std::move(decays)) {}
  HostParameterGroup(std::vector<Parameter<bf16, float>> params, AdamWConfig cfg, AdamW<float>::DecayRule decays = {})
      : bf16_(std::move(params)), masters_(bf16_.size()), opt_(master_views(bf16_, masters_), cfg, std::move(decays)) {
    reload_masters();
  }
  // The masters from the bf16 values (after something else wrote them).
  void reload_masters() {
    for (std::size_t i = 0; i < bf16_.size(); ++i)
      for (std::int64_t j = 0; j < bf16_[i].numel(); ++j) masters_[i][std::size_t(j)] = float(bf16_[i].value[j]);
  }
  // The fp32 master of bf16 parameter i (a bf16 group only).
  const std::vector<float>& master(std::size_t i) const { return masters_.at(i); }
  void grad_squares(NormSquares& sq) override {
    for (const auto& p : opt_.parameters()) {
      const double s = detail::sum_squares(p.grad, p.numel());
      if (!std::isfinite(s)) throw NumericError("gradient of " + p.name + " is not finite");
      sq.add(p.shard, s);
    }
  }
  void scale_grads(double factor) override {
    for (auto& p : opt_.parameters())
      for (std::int64_t i = 0; i < p.numel(); ++i) p.grad[i] = float(double(p.grad[i]) * factor);
  }
  void step(double lr) override {
    opt_.step(lr);
    for (std::size_t i = 0; i < bf16_.size(); ++i)
      for (std::int64_t j = 0; j < bf16_[i].numel(); ++j) bf16_[i].value[j] = bf16(masters_[i][std::size_t(j)]);
  }
  void zero_grad() override { opt_.zero_grad(); }
  AdamW<float>& optimizer() { return opt_; }

  std::vector<Parameter<float>> checkpoint_parameters() const override { return opt_.parameters(); }
  void save_state(std::size_t i, float* value, float* m, float* v) const override {
    const Parameter<float>& p = opt_.parameters().at(i);  // a bf16 group's: the master
    const auto n = std::size_t(p.numel());
    std::copy_n(p.value, n, value);
    std::copy_n(opt_.exp_avg(i).data(), n, m);
    std::copy_n(opt_.exp_avg_sq(i).data(), n, v);
  }
  void load_state(std::size_t i, const float* value, const float* m, const float* v) override {
    const Parameter<float>& p = opt_.parameters().at(i);
    const auto n = std::size_t(p.numel());
    std::copy_n(value, n, p.value);
    std::copy_n(m, n, opt_.exp_avg(i).data());
    std::copy_n(v, n, opt_.exp_avg_sq(i).data());
    if (!bf16_.empty())
      for (std::size_t j = 0; j < n; ++j) bf16_[i].value[j] = bf16(masters_[i][j]);
  }
  std::int64_t steps_taken() const override { return opt_.steps_taken(); }
  void set_steps_taken(std::int64_t t) override { opt_.set_steps_taken(t); }

 private:
  static std::vector<Parameter<float>> master_views(const std::vector<Parameter<bf16, float>>& ps, std::vector<std::vector<float>>& m) {
    std::vector<Parameter<float>> v;
    for (std::size_t i = 0; i < ps.size(); ++i) {
      if (ps[i].numel() > 0 && (!ps[i].value || !ps[i].grad)) throw ShapeError("parameter " + ps[i].name + " has a null value or grad pointer");
      m[i].assign(std::size_t(ps[i].numel()), 0.f);
      v.push_back({ps[i].name, m[i].data(), ps[i].grad, ps[i].shape, ps[i].shard});
    }
    return v;
  }
  std::vector<Parameter<bf16, float>> bf16_;  // empty for an fp32 group
  std::vector<std::vector<float>> masters_;
  AdamW<float> opt_;
};

}  // namespace moekit::train
