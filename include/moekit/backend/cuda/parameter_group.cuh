#pragma once
// backend::cuda::AdamWGroup: a CUDA layer's parameters as a train::ParameterGroup
// (train/parameter_group.hpp): AdamW moments in fp32 on the device, the update by adamw_update and the
// squared gradient norm by sum_of_squares (backend/cuda/optim.cuh), on one stream. Per optimizer step
// only the per-parameter sums of squares (one double each) come to the host; values, gradients and
// moments stay on the device. The arithmetic is train::AdamW's (train/adamw.hpp) in fp32. bf16 values
// get an fp32 master copy in the group (made from the values when the group is made): the step updates
// the master and writes it rounded to the values, so updates below bf16's resolution accumulate
// instead of vanishing. Whoever writes the values behind the group's back calls reload_masters(); a
// checkpoint load (load_state) writes the master and the values together.
#include <cuda_runtime.h>
#include <library_types.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "moekit/backend/cuda/activation.cuh"  // convert
#include "moekit/backend/cuda/memory.cuh"
#include "moekit/backend/cuda/optim.cuh"
#include "moekit/backend/cuda/parameter_store.cuh"  // DeviceParameter
#include "moekit/backend/cuda/status.cuh"
#include "moekit/core/error.hpp"
#include "moekit/train/parameter_group.hpp"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

class AdamWGroup final : public train::ParameterGroup {
 public:
  using DecayRule = std::function<bool(const DeviceParameter&)>;

  // params: e.g. a CUDA MoeLayer's parameters() (values in the storage type, bf16 or fp32, or fp32;
  // fp32 gradients). decays: which get weight decay (default: all, as train::AdamW).
  AdamWGroup(std::vector<DeviceParameter> params, train::AdamWConfig cfg, DecayRule decays = {}, cudaStream_t stream = nullptr)
      : params_(std::move(params)), cfg_(cfg), stream_(stream) {
    cfg_.validate();
    std::int64_t total = 0, masters = 0;
    for (const auto& p : params_) {
      if (p.numel() > 0 && (!p.value || !p.grad)) throw ShapeError("parameter " + p.name + " has a null value or grad pointer");
      if (p.dtype != CUDA_R_32F && p.dtype != CUDA_R_16BF)
        throw ShapeError("parameter " + p.name + ": AdamWGroup takes fp32 or bf16 values");
      offset_.push_back(total);
      total += p.numel();
      master_offset_.push_back(p.dtype == CUDA_R_16BF ? masters : -1);
      if (p.dtype == CUDA_R_16BF) masters += p.numel();
      decay_.push_back(!decays || decays(p));
    }
    moments_.resize(std::size_t(2 * total));
    if (total) MOEKIT_CUDA_CHECK(cudaMemsetAsync(moments_.data(), 0, moments_.size() * sizeof(float), stream_));
    masters_.resize(std::size_t(masters));
    reload_masters();
    partial_.resize(std::size_t(kSquareBlocks));
    sums_.resize(params_.size() ? params_.size() : 1);
    host_sums_.resize(params_.size() ? params_.size() : 1);
    total_ = total;
  }

  const std::vector<DeviceParameter>& parameters() const { return params_; }
  // m then v of parameter i, on the device (for checkpoints).
  float* exp_avg(std::size_t i) const { return moments_.data() + offset_.at(i); }
  float* exp_avg_sq(std::size_t i) const { return moments_.data() + total_ + offset_.at(i); }
  // The fp32 master copy of bf16 parameter i on the device (null for an fp32 parameter: its values are their own master).
  float* master(std::size_t i) const { return master_offset_.at(i) < 0 ? nullptr : masters_.data() + master_offset_[i]; }
  // The masters from the bf16 values (after something else wrote them).
  void reload_masters() {
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (float* mp = master(i))
        MOEKIT_CUDA_CHECK(convert(static_cast<const __nv_bfloat16*>(params_[i].value), mp, std::size_t(params_[i].numel()), stream_));
  }

  void grad_squares(NormSquares& sq) override {
    for (std::size_t i = 0; i < params_.size(); ++i)
      MOEKIT_CUDA_CHECK(sum_of_squares(params_[i].grad, params_[i].numel(), partial_.data(), sums_.data() + i, false, stream_));
    if (!params_.empty())
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(host_sums_.data(), sums_.data(), params_.size() * sizeof(double), cudaMemcpyDeviceToHost, stream_));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const double s = host_sums_.data()[i];
      if (!std::isfinite(s)) throw NumericError("gradient of " + params_[i].name + " is not finite");
      sq.add(params_[i].shard, s);
    }
  }
  void scale_grads(double factor) override {
    for (auto& p : params_) MOEKIT_CUDA_CHECK(backend::cuda::scale_grads(p.grad, p.numel(), factor, stream_));
  }
  void step(double lr) override {
    if (!(lr >= 0.0) || !std::isfinite(lr)) throw ConfigError("lr", moekit::detail::str(lr), "must be finite and >= 0");
    ++t_;
    const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t_)), bc2 = 1.0 - std::pow(cfg_.beta2, double(t_));
    AdamWStep a;
    a.step_size = float(lr / bc1), a.bc2_sqrt = float(std::sqrt(bc2));
    a.one_minus_b1 = float(1.0 - cfg_.beta1), a.b2 = float(cfg_.beta2), a.one_minus_b2 = float(1.0 - cfg_.beta2);
    a.eps = float(cfg_.eps);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const DeviceParameter& p = params_[i];
      a.shrink = float(1.0 - lr * (decay_[i] ? cfg_.weight_decay : 0.0));
      float *m = exp_avg(i), *v = exp_avg_sq(i);
      if (p.dtype == CUDA_R_32F) MOEKIT_CUDA_CHECK(adamw_update(static_cast<float*>(p.value), p.grad, m, v, p.numel(), a, stream_));
      else MOEKIT_CUDA_CHECK(adamw_update(static_cast<__nv_bfloat16*>(p.value), master(i), p.grad, m, v, p.numel(), a, stream_));
    }
  }
  void zero_grad() override {
    for (auto& p : params_)
      if (p.numel()) MOEKIT_CUDA_CHECK(cudaMemsetAsync(p.grad, 0, std::size_t(p.numel()) * sizeof(float), stream_));
  }

  // Checkpoints: names, shapes and shards (the pointers are the device ones; a bf16 value's is its master).
  std::vector<Parameter<float>> checkpoint_parameters() const override {
    std::vector<Parameter<float>> ps;
    for (std::size_t i = 0; i < params_.size(); ++i)
      ps.push_back({params_[i].name, fp32_value(i), params_[i].grad, params_[i].shape, params_[i].shard});
    return ps;
  }
  void save_state(std::size_t i, float* value, float* m, float* v) const override {
    const std::size_t bytes = std::size_t(params_.at(i).numel()) * sizeof(float);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(value, fp32_value(i), bytes, cudaMemcpyDeviceToHost, stream_));
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(m, exp_avg(i), bytes, cudaMemcpyDeviceToHost, stream_));
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(v, exp_avg_sq(i), bytes, cudaMemcpyDeviceToHost, stream_));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void load_state(std::size_t i, const float* value, const float* m, const float* v) override {
    const std::size_t n = std::size_t(params_.at(i).numel()), bytes = n * sizeof(float);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(fp32_value(i), value, bytes, cudaMemcpyHostToDevice, stream_));
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(exp_avg(i), m, bytes, cudaMemcpyHostToDevice, stream_));
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(exp_avg_sq(i), v, bytes, cudaMemcpyHostToDevice, stream_));
    if (float* mp = master(i)) MOEKIT_CUDA_CHECK(convert(mp, static_cast<__nv_bfloat16*>(params_[i].value), n, stream_));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  std::int64_t steps_taken() const override { return t_; }
  void set_steps_taken(std::int64_t t) override {
    if (t < 0) throw ConfigError("steps_taken", std::to_string(t), "must be >= 0");
    t_ = t;
  }

 private:
  // The fp32 values of parameter i on the device: its master (bf16) or its values (fp32).
  float* fp32_value(std::size_t i) const { return master(i) ? master(i) : static_cast<float*>(params_.at(i).value); }
  std::vector<DeviceParameter> params_;
  train::AdamWConfig cfg_;
  cudaStream_t stream_ = nullptr;
  std::vector<std::int64_t> offset_, master_offset_;  // master_offset_: -1 for fp32 parameters
  std::vector<bool> decay_;
  std::int64_t total_ = 0, t_ = 0;
  DeviceArray<float> moments_;  // m [total] then v [total]
  DeviceArray<float> masters_;  // fp32 copies of the bf16 parameters, in parameter order
  DeviceArray<double> partial_, sums_;
  PinnedArray<double> host_sums_;
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
