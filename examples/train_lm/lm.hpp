#pragma once
// The model as main.cpp and report.hpp use it, whichever backend it runs on: HostLm (model.hpp's
// LmModel<float>, on the host) or the CUDA model (cuda_lm.hpp, everything on the GPU). Host pointers
// in and out: token ids, targets, each byte's loss, one row of logits; the CUDA model keeps every
// activation and parameter on the device and copies only those (and the loss) across.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <moekit/backend/host/blas.hpp>

#include "model.hpp"

// The dense-GEMM ceiling that model-FLOPs utilisation is measured against: the FLOP/s of the best of a
// few large square products in the model's precision on the model's backend, and what was measured.
struct GemmCeiling {
  double flops_per_s = 0;
  std::string what;
};

// The host's: sgemm of n x n x n through backend::host::gemm (the model's BLAS) on the current threads.
inline GemmCeiling host_gemm_ceiling(std::int64_t n = 1024, int reps = 5) {
  std::vector<float> a(static_cast<std::size_t>(n * n), 0.5f), b(a.size(), 0.25f), c(a.size());
  auto once = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    moekit::backend::host::gemm<float>(false, true, n, n, n, 1.f, a.data(), b.data(), 0.f, c.data());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  once();  // warm-up: threads, pages
  double best = 1e30;
  for (int r = 0; r < reps; ++r) best = std::min(best, once());
  return {2.0 * double(n) * double(n) * double(n) / best, "host sgemm " + std::to_string(n) + "^3 on " +
                                                            std::to_string(omp_get_max_threads()) + " threads, best of " +
                                                            std::to_string(reps)};
}

class Lm {
 public:
  template <class U>
  using Matrix = moekit::MatrixView<U>;
  virtual ~Lm() = default;

  virtual const LmConfig& config() const = 0;
  virtual const moekit::MoeConfig& layer_config() const = 0;
  std::int64_t total_experts() const { return layer_config().num_experts(); }
  virtual MoeBlock<float>& moe(std::int64_t l) = 0;

  // As LmModel's: forward of batch sequences of seq bytes, the mean loss (grad_scale > 0 also prepares
  // the backward; token_loss [rows] receives each byte's loss), the backward, block l's aux losses.
  virtual void forward(const std::int32_t* inputs, std::int64_t batch, std::int64_t seq) = 0;
  virtual double loss(const std::int32_t* targets, double grad_scale = 0.0, float* token_loss = nullptr) = 0;
  virtual void backward(double aux_scale) = 0;
  virtual moekit::AuxLosses aux(std::int64_t l) const = 0;
  // Row `row` of the last forward's logits [256] (host memory, valid until the next call).
  virtual const float* logits_row(std::int64_t row) = 0;

  // Host parameters (the trainer's AdamW steps them): dense ones, all of this rank's, and every
  // parameter's shape wherever it lives (for counting). The CUDA model has no host parameters.
  virtual std::vector<moekit::Parameter<float>> dense_parameters() = 0;
  virtual std::vector<moekit::Parameter<float>> dense_parameter_shapes() = 0;  // wherever they live
  virtual std::vector<moekit::Parameter<float>> parameters() = 0;
  virtual std::vector<moekit::Parameter<float>> parameter_shapes() = 0;
  // Parameters that live elsewhere, stepped where they are (train/parameter_group.hpp).
  virtual std::vector<moekit::train::ParameterGroup*> parameter_groups(const moekit::train::AdamWConfig& ac) = 0;
  virtual std::vector<std::vector<double>> router_states() const = 0;
  virtual void set_router_states(const std::vector<std::vector<double>>& s) = 0;
  virtual void sync_moe_gradients() = 0;
  virtual void zero_grad() = 0;
  virtual void end_step() = 0;
  virtual void set_training(bool on) = 0;
  // "host" or "cuda: GPU 0 (...)".
  virtual std::string describe() const = 0;
  virtual GemmCeiling gemm_ceiling() = 0;  // measured now (a fraction of a second)
};

class HostLm final : public Lm {
 public:
  HostLm(const LmConfig& c, std::uint64_t seed, const MoeBlockFactory<float>& factory) : m_(c, seed, factory) {}
  LmModel<float>& model() { return m_; }

  const LmConfig& config() const override { return m_.config(); }
  const moekit::MoeConfig& layer_config() const override { return m_.layer_config(); }
  MoeBlock<float>& moe(std::int64_t l) override { return m_.moe(l); }
  void forward(const std::int32_t* inputs, std::int64_t batch, std::int64_t seq) override { m_.forward(inputs, batch, seq); }
  double loss(const std::int32_t* targets, double grad_scale, float* token_loss) override { return m_.loss(targets, grad_scale, token_loss); }
  void backward(double aux_scale) override { m_.backward(aux_scale); }
  moekit::AuxLosses aux(std::int64_t l) const override { return m_.aux(l); }
  const float* logits_row(std::int64_t row) override { return m_.logits().row(row); }
  std::vector<moekit::Parameter<float>> dense_parameters() override { return m_.dense_parameters(); }
  std::vector<moekit::Parameter<float>> dense_parameter_shapes() override { return m_.dense_parameters(); }
  std::vector<moekit::Parameter<float>> parameters() override { return m_.parameters(); }
  std::vector<moekit::Parameter<float>> parameter_shapes() override { return m_.parameter_shapes(); }
  std::vector<moekit::train::ParameterGroup*> parameter_groups(const moekit::train::AdamWConfig& ac) override {
    return m_.parameter_groups(ac);
  }
  std::vector<std::vector<double>> router_states() const override { return m_.router_states(); }
  void set_router_states(const std::vector<std::vector<double>>& s) override { m_.set_router_states(s); }
  void sync_moe_gradients() override { m_.sync_moe_gradients(); }
  void zero_grad() override { m_.zero_grad(); }
  void end_step() override { m_.end_step(); }
  void set_training(bool on) override { m_.set_training(on); }
  std::string describe() const override { return "host"; }
  GemmCeiling gemm_ceiling() override { return host_gemm_ceiling(); }

 private:
  LmModel<float> m_;
};
