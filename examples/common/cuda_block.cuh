#pragma once
// CudaMoeBlock<Layer>: one CUDA MoE layer behind cuda_blocks.hpp's DeviceMoeBlock (and so MoeBlock),
// shared by cuda_blocks.cu (the unbiased routers) and cuda_blocks_bias.cu (router::BiasBalanced), which
// split the layer types between them to bound nvcc's time per translation unit. Included from those two
// .cu files only.
#if defined(MOEKIT_EXAMPLE_HAS_MPI) && defined(MOEKIT_HAS_NCCL)
#define MOEKIT_EXAMPLE_CUDA_DISTRIBUTED 1
#include <moekit/parallel/cuda_moe_layer.cuh>
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <moekit/backend/cuda/moe_layer.cuh>
#include <moekit/backend/cuda/parameter_group.cuh>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_blocks.hpp"

namespace {

namespace mk = moekit;
template <class U>
using Matrix = mk::MatrixView<U>;

// The CUDA stream the block's copies and layer calls are ordered on: the caller's (not owned), or one of
// its own on the current device.
class Stream {
 public:
  explicit Stream(void* external) : s_(static_cast<cudaStream_t>(external)), owned_(external == nullptr) {
    if (owned_) MOEKIT_CUDA_CHECK(cudaStreamCreate(&s_));
  }
  ~Stream() {
    if (owned_) cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void sync() const { MOEKIT_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
  bool owned_;
};

template <class T>
void to_device(T* dst, const T* src, std::int64_t n, cudaStream_t s) {
  if (n > 0) MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dst, src, std::size_t(n) * sizeof(T), cudaMemcpyHostToDevice, s));
}
template <class T>
void to_host(T* dst, const T* src, std::int64_t n, cudaStream_t s) {
  if (n > 0) MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dst, src, std::size_t(n) * sizeof(T), cudaMemcpyDeviceToHost, s));
}

// One CUDA layer (Layer = MoeLayer<backend::Cuda<float>, R, E, B, P>) behind the host interface.
//
// forward/backward take the model's host views: the input (x, or dy and the next block's dlogits) is
// copied to device buffers, the layer runs on the block's stream, the outputs (y, or dx and dprev_logits)
// are copied back, and the call returns after a stream synchronisation. logits(), probs() and
// topk_indices() download on first use after a forward (the gating residual and the evaluation's routing
// table use them).
//
// Parameters: they stay on the device. parameters() lists none (the host optimizer never sees them);
// parameter_group() is a backend::cuda::AdamWGroup over the layer's flat buffers, which the trainer
// clips and steps on the block's stream: per step only the sums of squares (one double per tensor)
// come to the host. parameter_shapes() gives the names, shapes and shards (for counting).
//
// A bf16 layer (Layer's storage __nv_bfloat16: bf16 activations and weights, fp32 logits, gradients
// and AdamW masters) runs on device pointers only: its host-view forward and backward throw.
template <class S>
using host_storage_t = std::conditional_t<std::is_same_v<S, float>, float, mk::bf16>;  // same bits

template <class Layer>
class CudaMoeBlock final : public DeviceMoeBlock<host_storage_t<typename Layer::storage_type>> {
  using S = typename Layer::storage_type;
  using V = host_storage_t<S>;
  static constexpr bool kF32 = std::is_same_v<S, float>;
  static_assert(sizeof(V) == sizeof(S));

 public:
  // stream: the caller's cudaStream_t, or null for one of the block's own. Extra arguments go to the
  // layer's constructor (the NCCL world of a distributed layer).
  template <class... Args>
  explicit CudaMoeBlock(const mk::MoeConfig& c, void* stream, Args&... args) : stream_(stream), layer_(c, args...) {
    if constexpr (kF32)
      for (const mk::DeviceParameter& p : layer_.parameters())  // the host layers' names and order (one table)
        if (p.dtype != CUDA_R_32F) throw std::logic_error("CudaMoeBlock: fp32 layer parameter " + p.name + " is not fp32");
    layer_.zero_grad(stream_.get());
    stream_.sync();
  }

  const mk::MoeConfig& config() const override { return layer_.config(); }

  mk::AuxLosses forward(Matrix<const float> x, Matrix<float> y, Matrix<const float> prev) override {
    if constexpr (!kF32) throw std::logic_error("CudaMoeBlock: a bf16 CUDA block runs on device pointers only (forward_device)");
    else return host_forward(x, y, prev);
  }
  void backward(Matrix<const float> dy, Matrix<float> dx, double aux_scale, Matrix<const float> dnext, Matrix<float> dprev) override {
    if constexpr (!kF32) throw std::logic_error("CudaMoeBlock: a bf16 CUDA block runs on device pointers only (backward_device)");
    else host_backward(dy, dx, aux_scale, dnext, dprev);
  }

 private:
  mk::AuxLosses host_forward(Matrix<const float> x, Matrix<float> y, Matrix<const float> prev) {
    const std::int64_t rows = x.shape[0], d = config().d_model, n = config().num_experts();
    mk::check_shape(x, "x", {rows, d});
    mk::check_shape(y, "y", {rows, d});
    if (prev.data) mk::check_shape(prev, "prev_logits", {rows, n});
    fit(rows);
    const cudaStream_t s = stream_.get();
    to_device(in_.data(), x.data, rows * d, s);
    Matrix<const float> prev_dev;
    if (prev.data) {
      to_device(lin_.data(), prev.data, rows * n, s);
      prev_dev = Matrix<const float>(lin_.data(), {rows, n});
    }
    const mk::AuxLosses aux = layer_.forward(Matrix<const float>(in_.data(), {rows, d}), Matrix<float>(out_.data(), {rows, d}), prev_dev, s);
    to_host(y.data, out_.data(), rows * d, s);
    stream_.sync();
    have_logits_ = have_probs_ = have_idx_ = false;
    return aux;
  }

  void host_backward(Matrix<const float> dy, Matrix<float> dx, double aux_scale, Matrix<const float> dnext, Matrix<float> dprev) {
    const std::int64_t rows = layer_.num_tokens(), d = config().d_model, n = config().num_experts();
    mk::check_shape(dy, "dy", {rows, d});
    mk::check_shape(dx, "dx", {rows, d});
    if (dnext.data) mk::check_shape(dnext, "dlogits_next", {rows, n});
    if (dprev.data) mk::check_shape(dprev, "dprev_logits", {rows, n});
    const cudaStream_t s = stream_.get();
    // The forward's input buffers are free again: the layer keeps its own copies of x and prev_logits.
    to_device(in_.data(), dy.data, rows * d, s);
    Matrix<const float> dnext_dev;
    Matrix<float> dprev_dev;
    if (dnext.data) {
      to_device(lin_.data(), dnext.data, rows * n, s);
      dnext_dev = Matrix<const float>(lin_.data(), {rows, n});
    }
    if (dprev.data) dprev_dev = Matrix<float>(lout_.data(), {rows, n});
    layer_.backward(Matrix<const float>(in_.data(), {rows, d}), Matrix<float>(out_.data(), {rows, d}), aux_scale, dnext_dev,
                    dprev_dev, s);
    to_host(dx.data, out_.data(), rows * d, s);
    if (dprev.data) to_host(dprev.data, lout_.data(), rows * n, s);
    stream_.sync();
  }

 private:
  // A CUDA layer never allocates in forward; 0 rows still needs a workspace (reserve(0) binds none).
  void reserve_for(std::int64_t rows) {
    if (rows > layer_.reserved_tokens() || layer_.reserved_tokens() == 0) layer_.reserve(std::max<std::int64_t>(rows, 1));
  }

 public:
  mk::AuxLosses forward_device(const V* x, V* y, const float* prev, std::int64_t rows) override {
    const std::int64_t d = config().d_model, n = config().num_experts();
    reserve_for(rows);
    const mk::AuxLosses aux = layer_.forward(Matrix<const S>(reinterpret_cast<const S*>(x), {rows, d}), Matrix<S>(reinterpret_cast<S*>(y), {rows, d}),
                                             prev ? Matrix<const float>(prev, {rows, n}) : Matrix<const float>{}, stream_.get());
    have_logits_ = have_probs_ = have_idx_ = false;
    return aux;
  }
  void backward_device(const V* dy, V* dx, double aux_scale, const float* dnext, float* dprev) override {
    const std::int64_t rows = layer_.num_tokens(), d = config().d_model, n = config().num_experts();
    layer_.backward(Matrix<const S>(reinterpret_cast<const S*>(dy), {rows, d}), Matrix<S>(reinterpret_cast<S*>(dx), {rows, d}), aux_scale,
                    dnext ? Matrix<const float>(dnext, {rows, n}) : Matrix<const float>{},
                    dprev ? Matrix<float>(dprev, {rows, n}) : Matrix<float>{}, stream_.get());
  }
  const float* logits_device() const override { return layer_.logits_device(); }

  Matrix<const float> logits() const override {
    return download(layer_.logits_device(), config().num_experts(), logits_, have_logits_);
  }
  Matrix<const float> probs() const override { return download(layer_.probs_device(), config().num_experts(), probs_, have_probs_); }
  Matrix<const std::int32_t> topk_indices() const override {
    static_assert(sizeof(int) == sizeof(std::int32_t));
    return download(reinterpret_cast<const std::int32_t*>(layer_.topk_indices_device()), config().top_k, idx_, have_idx_);
  }
  typename DeviceMoeBlock<host_storage_t<typename Layer::storage_type>>::Routed routed() const override {
    if (layer_.routing() == mk::Routing::kTokenChoice) return DeviceMoeBlock<host_storage_t<typename Layer::storage_type>>::routed();
    const auto plan = layer_.routing_plan_device();  // by token, device memory
    typename DeviceMoeBlock<host_storage_t<typename Layer::storage_type>>::Routed r;
    r.first.resize(std::size_t(plan.layout.tokens + 1)), r.experts.resize(std::size_t(plan.layout.slots));
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(r.first.data(), plan.layout.first, sizeof(int) * r.first.size(), cudaMemcpyDeviceToHost, stream_.get()));
    if (!r.experts.empty())
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(r.experts.data(), plan.expert, sizeof(int) * r.experts.size(), cudaMemcpyDeviceToHost, stream_.get()));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    return r;
  }
  mk::VectorView<const std::int32_t> expert_counts() const override { return layer_.expert_counts(); }
  const std::vector<std::int64_t>& routed_counts() const override { return layer_.routed_counts(); }
  std::int64_t expert_gemm_flops() const override { return layer_.expert_gemm_flops(); }
  std::int64_t ffn_rows() const override { return layer_.ffn_rows(); }

  // The host layer's values for the seed (the distributed layer: this rank's shard of them), on the
  // device and in the mirrors.
  void init_params(std::uint64_t seed) override {
    layer_.init_params(seed);
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());  // init_params uploads with plain cudaMemcpy
  }
  std::vector<mk::Parameter<float>> parameters(const std::string&) override { return {}; }
  std::vector<mk::Parameter<float>> parameter_shapes(const std::string& prefix) override {
    std::vector<mk::Parameter<float>> ps;
    for (const mk::DeviceParameter& p : layer_.parameters()) ps.push_back({prefix + p.name, nullptr, nullptr, p.shape, p.shard});
    return ps;
  }
  mk::train::ParameterGroup* parameter_group(const mk::train::AdamWConfig& ac) override {
    if (!group_)
      group_ = std::make_unique<mk::backend::cuda::AdamWGroup>(
          layer_.parameters(), ac, [](const mk::DeviceParameter& p) { return p.shape.size() >= 2; }, stream_.get());
    return group_.get();
  }
  void zero_grad() override {  // once the trainer holds the group, it zeroes the gradients (once per step)
    if (!group_) layer_.zero_grad(stream_.get());
  }
  void sync_gradients() override {  // distributed: NCCL all-reduces of the device gradients
    if constexpr (requires(cudaStream_t s) { layer_.sync_gradients(s); }) layer_.sync_gradients(stream_.get());
  }
  void end_step() override {
    layer_.end_step(stream_.get());
  }
  void set_training(bool on) override { layer_.set_training(on); }

 private:
  // Workspace and copy buffers for `rows` tokens (they only grow; every rank of a distributed run sees
  // the same row counts in the same order, so all reserve alike, as the layer requires).
  void fit(std::int64_t rows) {
    reserve_for(rows);
    if (rows <= capacity_) return;
    const std::size_t d = std::size_t(config().d_model), n = std::size_t(config().num_experts());
    in_.resize(std::size_t(rows) * d), out_.resize(std::size_t(rows) * d);
    lin_.resize(std::size_t(rows) * n), lout_.resize(std::size_t(rows) * n);
    capacity_ = rows;
  }

  template <class U>
  Matrix<const U> download(const U* device, std::int64_t cols, std::vector<U>& host, bool& have) const {
    const std::int64_t rows = layer_.num_tokens();
    if (!have) {
      host.resize(std::size_t(rows * cols));
      to_host(host.data(), device, rows * cols, stream_.get());
      stream_.sync();
      have = true;
    }
    return Matrix<const U>(host.data(), {rows, cols});
  }

  Stream stream_;  // first: destroyed after the layer
  Layer layer_;
  std::unique_ptr<mk::backend::cuda::AdamWGroup> group_;  // after the layer: destroyed before it
  mk::backend::cuda::DeviceArray<float> in_, out_, lin_, lout_;  // x | dy, y | dx, prev | dlogits_next, dprev
  std::int64_t capacity_ = 0;
  mutable std::vector<float> logits_, probs_;
  mutable std::vector<std::int32_t> idx_;
  mutable bool have_logits_ = false, have_probs_ = false, have_idx_ = false;
};

// The flags' layer type on the CUDA backend, behind MoeBlock<float> (the rows Part keeps: one
// translation unit's share of TrainerRows).
template <class Parallel, class Part, class T = float, class... Args>
std::unique_ptr<DeviceMoeBlock<T>> make_cuda_block(const mk::MoeConfig& mc, bool global_balance, void* stream, Args&... args) {
  return with_moe_layer_type<mk::backend::Cuda<T>, Parallel, Part>(
      mc, global_balance, [&]<class Layer>(std::type_identity<Layer>) -> std::unique_ptr<DeviceMoeBlock<T>> {
        return std::make_unique<CudaMoeBlock<Layer>>(mc, stream, args...);
      });
}

}  // namespace

// The classic rows with an expert bias (cuda_blocks_bias.cu).
std::unique_ptr<DeviceMoeBlock<float>> make_biased_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream);
// The open models' rows (cuda_blocks_open.cu).
std::unique_ptr<DeviceMoeBlock<float>> make_open_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream);
// The bf16 layers, the classic rows, one process (cuda_blocks_bf16.cu).
std::unique_ptr<DeviceMoeBlock<moekit::bf16>> make_bf16_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream);
#if defined(MOEKIT_EXAMPLE_CUDA_DISTRIBUTED)
std::unique_ptr<DeviceMoeBlock<float>> make_biased_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream,
                                                       moekit::comm::Nccl& world);
std::unique_ptr<DeviceMoeBlock<float>> make_open_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream,
                                                     moekit::comm::Nccl& world);
#endif
