// train_lm --backend cuda (cuda_lm.hpp): model.hpp's model, layer for layer, on one GPU. The forward and
// backward below are LmModel's, with nn/cuda modules for the nn/ ones and device buffers for the host
// vectors; the initial values are the host modules' (LmInit's seeds), so both backends start from the
// same model and name its parameters alike (a checkpoint's tensors are the host model's names).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <moekit/backend/cuda/nn_ops.cuh>
#include <moekit/backend/cuda/parameter_group.cuh>
#include <moekit/nn/cuda/attention.cuh>
#include <moekit/nn/cuda/cross_entropy.cuh>
#include <moekit/nn/cuda/embedding.cuh>
#include <moekit/nn/cuda/rms_norm.cuh>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_lm.hpp"

namespace {

namespace mk = moekit;
namespace bc = moekit::backend::cuda;
namespace ncu = moekit::nn::cuda;

class OwnedStream {
 public:
  OwnedStream() { MOEKIT_CUDA_CHECK(cudaStreamCreate(&s_)); }
  ~OwnedStream() { cudaStreamDestroy(s_); }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// T: float, or moekit::bf16 (bf16 activations and weights, stored as __nv_bfloat16; fp32 gradients, logits
// of the routers, and AdamW masters).
template <class T>
class CudaLm final : public Lm {
  using S = bc::storage_t<T>;
  static constexpr bool kF32 = std::is_same_v<T, float>;

 public:
  CudaLm(const LmConfig& c, std::uint64_t seed, CudaMoeBackend& backend)
      : cfg_(c), mc_(c.layer_config()), describe_("cuda: " + backend.describe()), embed_(LmConfig::kVocab, c.d_model), final_norm_(c.d_model) {
    ctx_ = {stream_.get(), blas_.get()};
    const std::int64_t d = c.d_model, V = LmConfig::kVocab;
    {
      mk::nn::Embedding<float> host(V, d);
      host.init_params(LmInit::embed(seed), LmInit::embed_bound());
      embed_.load(host);
    }
    if (!c.tie_embeddings) {
      mk::nn::Linear<float> host(d, V, false);
      host.init_params(LmInit::head(seed));
      head_ = std::make_unique<ncu::Linear<T>>(d, V);
      head_->load(host);
    }
    for (std::int64_t l = 0; l < c.blocks; ++l) {
      attn_norms_.push_back(std::make_unique<ncu::RMSNorm<T>>(d));
      mk::nn::CausalSelfAttention<float> host(d, c.heads, c.kv_heads, c.seq, c.rope_theta);
      host.init_params(LmInit::attention(seed, l), LmInit::out_scale(c.blocks));
      attns_.push_back(std::make_unique<ncu::CausalSelfAttention<T>>(d, c.heads, c.kv_heads, c.seq, c.rope_theta));
      attns_.back()->load(host);
      moe_norms_.push_back(std::make_unique<ncu::RMSNorm<T>>(d));
      if constexpr (kF32) moes_.push_back(backend.make_block(mc_, c.global_balance, stream_.get()));
      else moes_.push_back(backend.make_bf16_block(mc_, c.global_balance, stream_.get()));
      moes_.back()->init_params(LmInit::moe(seed, l));
    }
    aux_.assign(std::size_t(c.blocks), {});
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  }

  const LmConfig& config() const override { return cfg_; }
  const mk::MoeConfig& layer_config() const override { return mc_; }
  MoeBlock<float>& moe(std::int64_t l) override { return *moes_[std::size_t(l)]; }
  std::string describe() const override { return describe_; }
  // A cuBLAS GEMM of n^3 in the model's storage type through the model's own GEMM path (fp32
  // accumulation), best of reps, timed with events.
  GemmCeiling gemm_ceiling() override {
    const std::int64_t n = kF32 ? 4096 : 8192;
    const int reps = 5;
    bc::DeviceArray<S> a(std::size_t(n * n)), b(std::size_t(n * n)), c(std::size_t(n * n));
    MOEKIT_CUDA_CHECK(cudaMemsetAsync(a.data(), 0x3c, a.size() * sizeof(S), stream_.get()));  // small finite values
    MOEKIT_CUDA_CHECK(cudaMemsetAsync(b.data(), 0x3c, b.size() * sizeof(S), stream_.get()));
    cudaEvent_t e0, e1;
    MOEKIT_CUDA_CHECK(cudaEventCreate(&e0));
    MOEKIT_CUDA_CHECK(cudaEventCreate(&e1));
    float best = 1e30f;
    for (int r = 0; r <= reps; ++r) {  // r = 0: warm-up
      MOEKIT_CUDA_CHECK(cudaEventRecord(e0, stream_.get()));
      ncu::linear_forward(ctx_, a.data(), b.data(), n, n, n, c.data());
      MOEKIT_CUDA_CHECK(cudaEventRecord(e1, stream_.get()));
      MOEKIT_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      MOEKIT_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (r > 0) best = std::min(best, ms);
    }
    cudaEventDestroy(e0), cudaEventDestroy(e1);
    return {2.0 * double(n) * double(n) * double(n) / (double(best) * 1e-3),
            std::string("cuBLAS ") + (kF32 ? "fp32" : "bf16") + " GEMM " + std::to_string(n) + "^3, best of " + std::to_string(reps)};
  }

  void forward(const std::int32_t* inputs, std::int64_t batch, std::int64_t seq) override {
    if (seq < 1 || seq > cfg_.seq)
      throw mk::ShapeError("CudaLm::forward: seq = " + std::to_string(seq) + " must be in [1, " + std::to_string(cfg_.seq) + "]");
    const std::int64_t rows = batch * seq, L = cfg_.blocks;
    ncu::check_ids(inputs, rows, LmConfig::kVocab, "inputs");
    resize(rows);
    seq_ = seq;
    upload_ids(inputs, ids_);
    embed_.forward(ctx_, ids_.data(), rows, h(0));
    for (std::int64_t l = 0; l < L; ++l) {
      attn_norms_[l]->forward(ctx_, h(l), rows, an(l));
      attns_[l]->forward(ctx_, an(l), rows, seq, tmp_.data());
      add(h(l), tmp_.data(), u(l));
      moe_norms_[l]->forward(ctx_, u(l), rows, mn(l));
      const bool residual = mc_.gating_residual && l > 0;  // block l's router adds W_g * (block l-1's logits)
      aux_[l] = moes_[l]->forward_device(host_type(mn(l)), host_type(tmp_.data()), residual ? moes_[l - 1]->logits_device() : nullptr, rows);
      add(u(l), tmp_.data(), h(l + 1));
    }
    final_norm_.forward(ctx_, h(L), rows, hf_.data());
    const std::int64_t d = cfg_.d_model, V = LmConfig::kVocab;
    if (head_) head_->forward(ctx_, hf_.data(), rows, logits_.data());
    else ncu::linear_forward(ctx_, hf_.data(), embed_.weight().value(), rows, d, V, logits_.data());
  }

  double loss(const std::int32_t* targets, double grad_scale, float* token_loss) override {
    ncu::check_ids(targets, rows_, LmConfig::kVocab, "targets");
    upload_ids(targets, targets_);
    const double l = ce_(ctx_, logits_.data(), targets_.data(), rows_, LmConfig::kVocab, grad_scale > 0 ? dlogits_.data() : nullptr, grad_scale);
    if (token_loss && rows_ > 0)
      MOEKIT_CUDA_CHECK(cudaMemcpy(token_loss, ce_.token_loss(), std::size_t(rows_) * sizeof(float), cudaMemcpyDeviceToHost));
    return l;
  }

  void backward(double aux_scale) override {
    const std::int64_t d = cfg_.d_model, V = LmConfig::kVocab, L = cfg_.blocks, rows = rows_;
    if (head_) head_->backward(ctx_, hf_.data(), dlogits_.data(), rows, dhf_.data());
    else  // logits = hf E^T: dE += dlogits^T hf, dhf = dlogits E
      ncu::linear_backward(ctx_, hf_.data(), embed_.weight().value(), embed_.weight().grad(), dlogits_.data(), rows, d, V, dhf_.data());
    final_norm_.backward(ctx_, h(L), dhf_.data(), rows, dh_.data());
    for (std::int64_t l = L - 1; l >= 0; --l) {
      const bool has_next = mc_.gating_residual && l + 1 < L, has_prev = mc_.gating_residual && l > 0;
      moes_[l]->backward_device(host_type(dh_.data()), host_type(dx_.data()), aux_scale, has_next ? dlog(l) : nullptr,
                                has_prev ? dlog(l - 1) : nullptr);
      moe_norms_[l]->backward(ctx_, u(l), dx_.data(), rows, tmp_.data());
      add(dh_.data(), tmp_.data(), dh_.data());
      attns_[l]->backward(ctx_, an(l), dh_.data(), rows, dx_.data());
      attn_norms_[l]->backward(ctx_, h(l), dx_.data(), rows, tmp_.data());
      add(dh_.data(), tmp_.data(), dh_.data());
    }
    embed_.backward(ctx_, ids_.data(), dh_.data(), rows);
  }

  mk::AuxLosses aux(std::int64_t l) const override { return aux_[std::size_t(l)]; }
  const float* logits_row(std::int64_t row) override {
    if (row < 0 || row >= rows_) throw mk::ShapeError("CudaLm::logits_row: row " + std::to_string(row) + " of " + std::to_string(rows_));
    row_.resize(LmConfig::kVocab);
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    bc::download_as<S>(logits_.data() + row * LmConfig::kVocab, std::size_t(LmConfig::kVocab), row_.data());
    return row_.data();
  }

  // Every parameter is on the device: none for the host optimizer.
  std::vector<mk::Parameter<float>> dense_parameters() override { return {}; }
  std::vector<mk::Parameter<float>> parameters() override { return {}; }
  std::vector<mk::Parameter<float>> dense_parameter_shapes() override {
    std::vector<mk::Parameter<float>> ps;
    for (const mk::DeviceParameter& p : dense_device_parameters()) ps.push_back({p.name, nullptr, nullptr, p.shape, p.shard});
    return ps;
  }
  std::vector<mk::Parameter<float>> parameter_shapes() override {
    std::vector<mk::Parameter<float>> ps = dense_parameter_shapes();
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      auto more = moes_[l]->parameter_shapes(LmInit::block_prefix(l) + "moe.");
      ps.insert(ps.end(), more.begin(), more.end());
    }
    return ps;
  }
  // The dense parameters as one group (weight decay on matrices, as the host trainer's rule), then each
  // MoE layer's; all on the model's stream.
  std::vector<mk::train::ParameterGroup*> parameter_groups(const mk::train::AdamWConfig& ac) override {
    if (!dense_group_)
      dense_group_ = std::make_unique<bc::AdamWGroup>(
          dense_device_parameters(), ac, [](const mk::DeviceParameter& p) { return p.shape.size() >= 2; }, stream_.get());
    std::vector<mk::train::ParameterGroup*> gs{dense_group_.get()};
    for (std::int64_t l = 0; l < cfg_.blocks; ++l)
      if (auto* g = moes_[l]->parameter_group(ac)) {
        g->set_checkpoint_prefix(LmInit::block_prefix(l) + "moe.");
        gs.push_back(g);
      }
    return gs;
  }
  std::vector<std::vector<double>> router_states() const override {
    std::vector<std::vector<double>> s;
    for (const auto& m : moes_) s.push_back(m->router_state());
    return s;
  }
  void set_router_states(const std::vector<std::vector<double>>& s) override {
    if (s.size() != moes_.size())
      throw mk::FormatError("router_states: " + std::to_string(s.size()) + " layers in the checkpoint, the model has " +
                            std::to_string(moes_.size()));
    for (std::size_t l = 0; l < s.size(); ++l) moes_[l]->set_router_state(s[l]);
  }
  void sync_moe_gradients() override {
    for (auto& m : moes_) m->sync_gradients();
  }
  void zero_grad() override {
    if (!dense_group_) {  // once the trainer holds the group, it zeroes the gradients
      const cudaStream_t s = stream_.get();
      embed_.zero_grad(s), final_norm_.zero_grad(s);
      if (head_) head_->zero_grad(s);
      for (std::int64_t l = 0; l < cfg_.blocks; ++l) attn_norms_[l]->zero_grad(s), attns_[l]->zero_grad(s), moe_norms_[l]->zero_grad(s);
    }
    for (auto& m : moes_) m->zero_grad();
  }
  void end_step() override {
    for (auto& m : moes_) m->end_step();
  }
  void set_training(bool on) override {
    for (auto& m : moes_) m->set_training(on);
  }

 private:
  // Named and ordered as LmModel::dense_parameters().
  std::vector<mk::DeviceParameter> dense_device_parameters() const {
    std::vector<mk::DeviceParameter> ps;
    auto add_all = [&](std::vector<mk::DeviceParameter> more) { ps.insert(ps.end(), more.begin(), more.end()); };
    add_all(embed_.parameters("embed."));
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      const std::string p = LmInit::block_prefix(l);
      add_all(attn_norms_[l]->parameters(p + "attn_norm."));
      add_all(attns_[l]->parameters(p + "attn."));
      add_all(moe_norms_[l]->parameters(p + "moe_norm."));
    }
    add_all(final_norm_.parameters("norm."));
    if (head_) add_all(head_->parameters("lm_head."));
    return ps;
  }

  // Host ids to a device buffer through pinned memory (after the stream has used the last ones).
  void upload_ids(const std::int32_t* ids, bc::DeviceArray<std::int32_t>& dst) {
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    std::copy(ids, ids + rows_, staging_.data());
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dst.data(), staging_.data(), std::size_t(rows_) * sizeof(std::int32_t), cudaMemcpyHostToDevice,
                                      stream_.get()));
  }
  void add(const S* a, const S* b, S* out) {
    MOEKIT_CUDA_CHECK(bc::add(a, b, out, rows_ * cfg_.d_model, stream_.get()));
  }
  // Activations of the last forward: one slab per kind, rows * d_model floats per block.
  S* h(std::int64_t l) const { return h_.data() + l * rows_ * cfg_.d_model; }
  S* an(std::int64_t l) const { return an_.data() + l * rows_ * cfg_.d_model; }
  S* u(std::int64_t l) const { return u_.data() + l * rows_ * cfg_.d_model; }
  S* mn(std::int64_t l) const { return mn_.data() + l * rows_ * cfg_.d_model; }
  // The MoE blocks name the storage by its host type (the same bits).
  static const T* host_type(const S* p) { return reinterpret_cast<const T*>(p); }
  static T* host_type(S* p) { return reinterpret_cast<T*>(p); }
  float* dlog(std::int64_t l) const { return dlog_.data() + l * rows_ * mc_.num_experts(); }

  void resize(std::int64_t rows) {
    rows_ = rows;
    if (rows <= capacity_) return;  // buffers only grow
    const std::int64_t n = rows * cfg_.d_model, L = cfg_.blocks;
    h_.resize(std::size_t((L + 1) * n));
    for (auto* b : {&an_, &u_, &mn_}) b->resize(std::size_t(L * n));
    for (auto* b : {&hf_, &dhf_, &dh_, &dx_, &tmp_}) b->resize(std::size_t(n));
    if (mc_.gating_residual) {
      dlog_.resize(std::size_t(L * rows * mc_.num_experts()));
      bc::fill_device(dlog_.data(), 0, dlog_.size() * sizeof(float));  // finished before the model's stream reads it
    }
    logits_.resize(std::size_t(rows * LmConfig::kVocab));
    dlogits_.resize(std::size_t(rows * LmConfig::kVocab));
    ids_.resize(std::size_t(rows)), targets_.resize(std::size_t(rows)), staging_.resize(std::size_t(rows));
    capacity_ = rows;
  }

  LmConfig cfg_;
  mk::MoeConfig mc_;
  std::string describe_;
  OwnedStream stream_;  // first: destroyed last
  ncu::Blas blas_;
  ncu::Context ctx_;
  ncu::Embedding<T> embed_;
  std::vector<std::unique_ptr<ncu::RMSNorm<T>>> attn_norms_, moe_norms_;
  std::vector<std::unique_ptr<ncu::CausalSelfAttention<T>>> attns_;
  std::vector<std::unique_ptr<DeviceMoeBlock<T>>> moes_;
  ncu::RMSNorm<T> final_norm_;
  std::unique_ptr<ncu::Linear<T>> head_;  // null: tied to the embedding
  ncu::CrossEntropy<T> ce_;
  std::unique_ptr<bc::AdamWGroup> dense_group_;  // made by parameter_groups(); destroyed before the tensors

  // The last forward's activations (rows_ = batch * seq_) and the backward's scratch, on the device.
  std::int64_t rows_ = 0, seq_ = 0, capacity_ = 0;
  std::vector<mk::AuxLosses> aux_;
  bc::DeviceArray<S> h_, an_, u_, mn_, hf_, dhf_, dh_, dx_, tmp_, logits_, dlogits_;
  bc::DeviceArray<float> dlog_;  // the gating residual's logit gradients: fp32
  bc::DeviceArray<std::int32_t> ids_, targets_;
  bc::PinnedArray<std::int32_t> staging_;
  std::vector<float> row_;
};

}  // namespace

std::unique_ptr<Lm> make_cuda_lm(const LmConfig& c, std::uint64_t seed, CudaMoeBackend& backend, bool bf16) {
  if (bf16) return std::make_unique<CudaLm<moekit::bf16>>(c, seed, backend);
  return std::make_unique<CudaLm<float>>(c, seed, backend);
}
