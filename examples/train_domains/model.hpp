#pragma once
// The next-token model of train_domains, forward and backward written out layer by layer:
//
//   h_0     = sum_j E_j[token_{t-1-j}],  j = 0..W-1      one embedding table per window position
//   h_{l+1} = h_l + MoE_l(RMSNorm_l(h_l))                 residual MoE blocks
//             (with --gating-residual, MoE_l's router also reads MoE_{l-1}'s logits)
//   logits  = LMHead(RMSNorm_f(h_L))
//   loss    = cross-entropy(logits, token_t)
//
// The W position tables are stored as one [W * vocab, d_model] table and looked up as a bag:
// window slot j of token id v reads row j * vocab + v.
//
// The MoE layers sit behind a virtual interface (MoeBlock) and come from a factory: by default
// make_moe_block (single-rank layers); parallel.hpp's factory gives the distributed host layers
// (--parallel), whose forward/backward communicate and whose parameters() list this rank's shard;
// cuda_blocks.hpp's gives CUDA layers (--backend cuda), whose parameters stay on the device as a
// train::ParameterGroup (parameter_groups()) that the trainer clips and steps there.
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <moekit/backend/host/convert.hpp>
#include <moekit/experts/granularity.hpp>
#include <moekit/layer/any_layer.hpp>
#include <moekit/moe_layer.hpp>
#include <moekit/nn/cross_entropy.hpp>
#include <moekit/nn/embedding.hpp>
#include <moekit/nn/linear.hpp>
#include <moekit/nn/rms_norm.hpp>
#include <moekit/train/adamw.hpp>
#include <moekit/train/parameter_group.hpp>

struct ModelConfig {
  std::int64_t vocab = 64;
  std::int64_t context = 8;  // W: tokens of the window
  std::int64_t d_model = 64;
  std::int64_t d_expert = 128;
  std::int64_t experts = 8;
  std::int64_t top_k = 2;
  std::int64_t blocks = 2;
  double lbl_coef = 0.01;
  double zloss_coef = 1e-3;
  // MoE++ (arXiv 2410.07348): zero-computation experts after the `experts` FFN experts, tau for the
  // heterogeneous balance loss, and the gating residual between consecutive MoE layers.
  std::int64_t zero_experts = 0, copy_experts = 0, constant_experts = 0;
  double tau = 1.0;
  bool gating_residual = false;
  bool global_balance = false;  // balance::GlobalBatch instead of balance::MicroBatch
  // Aux-loss-free balancing (DeepSeek-V3): router::BiasBalanced, with u = bias_update_rate.
  bool expert_bias = false;
  double bias_update_rate = 1e-3;

  // The config of each MoE layer (softmax top-k router, SwiGLU experts, dropless).
  moekit::MoeConfig moe_config() const {
    moekit::MoeConfig mc;
    mc.d_model = d_model;
    mc.d_expert = d_expert;
    mc.num_ffn_experts = experts;
    mc.num_zero_experts = zero_experts;
    mc.num_copy_experts = copy_experts;
    mc.num_constant_experts = constant_experts;
    mc.top_k = top_k;
    mc.tau = tau;
    mc.gating_residual = gating_residual;
    mc.expert_bias = expert_bias;
    mc.bias_update_rate = bias_update_rate;
    mc.lbl_coef = lbl_coef;
    mc.zloss_coef = zloss_coef;
    return mc;
  }
  std::int64_t total_experts() const { return experts + zero_experts + copy_experts + constant_experts; }
};

// One MoE layer behind a small virtual interface, so the model can hold whichever of the layer types
// the run-time flags pick. Virtual calls happen a few times per layer per step: nothing next to GEMMs.
template <class T>
class MoeBlock {
 public:
  template <class U>
  using Matrix = moekit::MatrixView<U>;
  virtual ~MoeBlock() = default;
  virtual const moekit::MoeConfig& config() const = 0;
  virtual moekit::AuxLosses forward(Matrix<const T> x, Matrix<T> y, Matrix<const T> prev_logits) = 0;
  virtual void backward(Matrix<const T> dy, Matrix<T> dx, double aux_scale, Matrix<const T> dlogits_next,
                        Matrix<T> dprev_logits) = 0;
  virtual Matrix<const T> logits() const = 0;
  virtual Matrix<const T> probs() const = 0;
  virtual Matrix<const std::int32_t> topk_indices() const = 0;
  virtual moekit::VectorView<const std::int32_t> expert_counts() const = 0;
  virtual const std::vector<std::int64_t>& routed_counts() const = 0;
  virtual std::int64_t expert_gemm_flops() const = 0;
  virtual std::int64_t ffn_rows() const = 0;
  virtual void init_params(std::uint64_t seed) = 0;
  virtual std::vector<moekit::Parameter<T>> parameters(const std::string& prefix) = 0;
  virtual void zero_grad() = 0;
  // Distributed layers: average the step's accumulated MoE gradients over the shards (a collective:
  // every rank calls it once per optimizer step, after the last backward). Single-rank: nothing.
  virtual void sync_gradients() = 0;
  // GlobalBatch: empty the count buffer after each optimizer step. MicroBatch: nothing to do.
  // After each optimizer step: the layer's per-step hook (GlobalBatch buffer reset, BiasBalanced update).
  virtual void end_step() = 0;
  // Evaluation forwards (false) do not add their counts to a GlobalBatch buffer.
  virtual void set_training(bool on) = 0;
  // Layers whose weights live elsewhere (the CUDA layers: on the device) list no host parameters; their
  // parameters are a train::ParameterGroup that the trainer clips and steps where they live (made on
  // first call with the trainer's AdamW config; weight decay on matrices, as the host's). Host layers:
  // none.
  virtual moekit::train::ParameterGroup* parameter_group(const moekit::train::AdamWConfig&) { return nullptr; }
  // Parameters of the layer wherever they live (for counting): shapes and shards; host layers: parameters().
  virtual std::vector<moekit::Parameter<T>> parameter_shapes(const std::string& prefix) { return parameters(prefix); }
  // A stateful router's values (BiasBalanced: the biases; empty otherwise), for checkpoints.
  virtual std::vector<double> router_state() const { return {}; }
  virtual void set_router_state(const std::vector<double>& v) {
    if (!v.empty()) throw std::logic_error("this MoE layer keeps no router state");
  }
};

// A host layer: the library's type-erased layer (moekit/layer/any_layer.hpp) behind the model's interface.
// V: the layer's storage type. V = T: the calls pass straight through. V = bf16 (--dtype bf16): x and dy
// arrive in T and are rounded to bf16 on the way in, y and dx come back widened (logits and their
// gradients are fp32 in the layer anyway); the parameters (bf16 values, fp32 gradients) are a
// train::HostParameterGroup with fp32 masters, which the trainer clips and steps beside the fp32 ones.
template <class T, class V = T>
class HostMoeBlock final : public MoeBlock<T> {
  template <class U>
  using Matrix = moekit::MatrixView<U>;
  using Layer = moekit::AnyMoeLayer<moekit::backend::Host<V>>;
  static constexpr bool kConverts = !std::is_same_v<T, V>;

 public:
  explicit HostMoeBlock(std::unique_ptr<Layer> layer) : layer_(std::move(layer)) {}
  const moekit::MoeConfig& config() const override { return layer_->config(); }
  moekit::AuxLosses forward(Matrix<const T> x, Matrix<T> y, Matrix<const T> prev) override {
    if constexpr (!kConverts) {
      return layer_->forward(x, y, prev);
    } else {
      moekit::check_shape(y, "y", {x.shape[0], config().d_model});
      const std::int64_t n = x.shape[0] * x.shape[1];
      in_.resize(std::size_t(n)), out_.resize(std::size_t(n));
      moekit::backend::host::convert(x.data, in_.data(), n);
      const auto aux = layer_->forward({in_.data(), x.shape}, {out_.data(), x.shape}, prev);
      moekit::backend::host::convert(out_.data(), y.data, n);
      return aux;
    }
  }
  void backward(Matrix<const T> dy, Matrix<T> dx, double aux_scale, Matrix<const T> dnext, Matrix<T> dprev) override {
    if constexpr (!kConverts) {
      layer_->backward(dy, dx, aux_scale, dnext, dprev);
    } else {
      moekit::check_shape(dx, "dx", {dy.shape[0], config().d_model});
      const std::int64_t n = dy.shape[0] * dy.shape[1];
      in_.resize(std::size_t(n)), out_.resize(std::size_t(n));
      moekit::backend::host::convert(dy.data, in_.data(), n);
      layer_->backward({in_.data(), dy.shape}, {out_.data(), dy.shape}, aux_scale, dnext, dprev);
      moekit::backend::host::convert(out_.data(), dx.data, n);
    }
  }
  Matrix<const T> logits() const override { return {layer_->views().logits, {layer_->num_tokens(), config().num_experts()}}; }
  Matrix<const T> probs() const override { return {layer_->views().probs, {layer_->num_tokens(), config().num_experts()}}; }
  Matrix<const std::int32_t> topk_indices() const override {
    return {layer_->views().topk_indices, {layer_->num_tokens(), config().top_k}};
  }
  moekit::VectorView<const std::int32_t> expert_counts() const override { return layer_->expert_counts(); }
  const std::vector<std::int64_t>& routed_counts() const override { return layer_->routed_counts(); }
  std::int64_t expert_gemm_flops() const override { return layer_->expert_gemm_flops(); }
  std::int64_t ffn_rows() const override { return layer_->ffn_rows(); }
  void init_params(std::uint64_t seed) override {
    layer_->init_params(seed);
    if constexpr (kConverts)
      if (group_) group_->reload_masters();
  }
  std::vector<moekit::Parameter<T>> parameters(const std::string& prefix) override {
    if constexpr (kConverts) return {};  // the group holds them
    else return layer_->parameters(prefix);
  }
  std::vector<moekit::Parameter<T>> parameter_shapes(const std::string& prefix) override {
    if constexpr (!kConverts) return layer_->parameters(prefix);
    std::vector<moekit::Parameter<T>> ps;
    for (const auto& p : layer_->parameters()) ps.push_back({prefix + p.name, nullptr, nullptr, p.shape, p.shard});
    return ps;
  }
  moekit::train::ParameterGroup* parameter_group(const moekit::train::AdamWConfig& ac) override {
    if constexpr (kConverts) {
      if (!group_)
        group_ = std::make_unique<moekit::train::HostParameterGroup>(layer_->parameters(), ac,
                                                                     [](const moekit::Parameter<float>& p) { return p.shape.size() >= 2; });
      return group_.get();
    } else {
      (void)ac;
      return nullptr;
    }
  }
  std::vector<double> router_state() const override {
    const auto v = layer_->router_state();
    return {v.begin(), v.end()};
  }
  void set_router_state(const std::vector<double>& v) override {
    using L = typename std::remove_cvref_t<decltype(layer_->router_state())>::value_type;
    const std::vector<std::remove_const_t<L>> l(v.begin(), v.end());
    layer_->set_router_state(l);
  }
  void zero_grad() override { layer_->zero_grad(); }
  void sync_gradients() override { layer_->sync_gradients(); }
  void end_step() override { layer_->end_step(); }
  void set_training(bool on) override { layer_->set_training(on); }

 private:
  std::unique_ptr<Layer> layer_;
  std::unique_ptr<moekit::train::HostParameterGroup> group_;  // kConverts only
  std::vector<V> in_, out_;                                    // kConverts only
};

// The trainer's model is always softmax top-k + SwiGLU, so it instantiates only the 8 layer types the
// flags can reach (gating residual x zero-computation experts x balance scope) rather than
// moekit::with_layer_type's full router x activation grid, which would compile 6x as many.
// with_moe_layer_type calls make(std::type_identity<MoeLayer<Backend, R, E, B, Parallel>>{}) for the
// flags' type and returns what it returns (the same type for all 8): make_moe_block below for the host
// layers, cuda_blocks.cu for the CUDA ones.
// kBias: both router families (the default), or one half (cuda_blocks.cu and cuda_blocks_bias.cu each
// instantiate one, to bound nvcc's time per translation unit).
template <class Backend, class Parallel, moekit::BiasVariants kBias = moekit::BiasVariants::kBoth, class Make>
auto with_moe_layer_type(const moekit::MoeConfig& mc, bool global_balance, Make&& make) {
  namespace mk = moekit;
  using Plain = mk::router::TopK<mk::router::Softmax>;
  using Ffn = mk::experts::Ffn<mk::act::SwiGLU>;
  using Mixed = mk::experts::Set<Ffn, mk::experts::Zero, mk::experts::Copy, mk::experts::Constant>;
  auto by_balance = [&]<class R, class E>(std::type_identity<R>, std::type_identity<E>) {
    if (global_balance) return make(std::type_identity<mk::MoeLayer<Backend, R, E, mk::balance::GlobalBatch, Parallel>>{});
    return make(std::type_identity<mk::MoeLayer<Backend, R, E, mk::balance::MicroBatch, Parallel>>{});
  };
  auto by_experts = [&]<class R>(std::type_identity<R> r) {
    if (mc.num_zc_experts() > 0) return by_balance(r, std::type_identity<Mixed>{});
    return by_balance(r, std::type_identity<Ffn>{});
  };
  using Residual = mk::router::GatingResidual<Plain>;
  if (kBias != mk::BiasVariants::kBoth && mc.expert_bias != (kBias == mk::BiasVariants::kBiased))
    throw std::logic_error("with_moe_layer_type: this call instantiates only the other half of the routers (expert bias)");
  if constexpr (kBias == mk::BiasVariants::kBiased) {
    if (mc.gating_residual) return by_experts(std::type_identity<mk::router::BiasBalanced<Residual>>{});
    return by_experts(std::type_identity<mk::router::BiasBalanced<Plain>>{});
  } else if constexpr (kBias == mk::BiasVariants::kUnbiased) {
    if (mc.gating_residual) return by_experts(std::type_identity<Residual>{});
    return by_experts(std::type_identity<Plain>{});
  } else {
    if (mc.expert_bias && mc.gating_residual) return by_experts(std::type_identity<mk::router::BiasBalanced<Residual>>{});
    if (mc.expert_bias) return by_experts(std::type_identity<mk::router::BiasBalanced<Plain>>{});
    if (mc.gating_residual) return by_experts(std::type_identity<Residual>{});
    return by_experts(std::type_identity<Plain>{});
  }
}

// The host layers. Parallel = parallel::None (args: none) or a distributed policy (args: the communicator).
template <class T, class Parallel = moekit::parallel::None, class... Args>
std::unique_ptr<MoeBlock<T>> make_moe_block(const moekit::MoeConfig& mc, bool global_balance, Args&... args) {
  return with_moe_layer_type<moekit::backend::Host<T>, Parallel>(
      mc, global_balance, [&]<class Layer>(std::type_identity<Layer>) -> std::unique_ptr<MoeBlock<T>> {
        return std::make_unique<HostMoeBlock<T>>(moekit::erase<Layer>(mc, args...));
      });
}

// --dtype bf16: the single-rank backend::Host<bf16> layers.
inline std::unique_ptr<MoeBlock<float>> make_bf16_moe_block(const moekit::MoeConfig& mc, bool global_balance) {
  return with_moe_layer_type<moekit::backend::Host<moekit::bf16>, moekit::parallel::None>(
      mc, global_balance, [&]<class Layer>(std::type_identity<Layer>) -> std::unique_ptr<MoeBlock<float>> {
        return std::make_unique<HostMoeBlock<float, moekit::bf16>>(moekit::erase<Layer>(mc));
      });
}

// Makes one MoE layer from its config and the balance scope. Called once per block, in block order.
template <class T>
using MoeBlockFactory = std::function<std::unique_ptr<MoeBlock<T>>(const moekit::MoeConfig&, bool global_balance)>;

// T = float for training; the unit tests instantiate it in double for finite differences.
template <class T = float>
class Model {
 public:
  template <class U>
  using Matrix = moekit::MatrixView<U>;

  // factory: how the MoE layers are made (empty: make_moe_block, single-rank layers). Every rank of a
  // distributed run initialises the same full model from `seed` and keeps its shard of the experts.
  Model(const ModelConfig& c, std::uint64_t seed, const MoeBlockFactory<T>& factory = {})
      : cfg_(c), embed_(c.context * c.vocab, c.d_model), final_norm_(c.d_model), head_(c.d_model, c.vocab) {
    const moekit::MoeConfig mc = c.moe_config();
    for (std::int64_t l = 0; l < c.blocks; ++l) {
      norms_.emplace_back(c.d_model);
      moes_.push_back(factory ? factory(mc, c.global_balance) : make_moe_block<T>(mc, c.global_balance));
      moes_.back()->init_params(seed + 100 + std::uint64_t(l));
    }
    // Each position's rows have variance 1/W, so h_0 (a sum of W of them) starts with unit RMS.
    embed_.init_params(seed + 1, std::sqrt(3.0 / double(c.context)));
    head_.init_params(seed + 2);
  }

  const ModelConfig& config() const { return cfg_; }
  MoeBlock<T>& moe(std::int64_t l) { return *moes_[l]; }
  // After each optimizer step: the MoE layers' per-step hook (GlobalBatch buffers emptied, BiasBalanced
  // biases updated from the step's counts).
  void end_step() {
    for (auto& m : moes_) m->end_step();
  }
  void set_training(bool on) {
    for (auto& m : moes_) m->set_training(on);
  }

  std::vector<moekit::Parameter<T>> parameters() {
    std::vector<moekit::Parameter<T>> ps;
    auto add = [&](std::vector<moekit::Parameter<T>> more) { ps.insert(ps.end(), more.begin(), more.end()); };
    add(embed_.parameters("embed."));
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      const std::string p = "blocks." + std::to_string(l) + ".";
      add(norms_[l].parameters(p + "norm."));
      add(moes_[l]->parameters(p + "moe."));
    }
    add(final_norm_.parameters("norm."));
    add(head_.parameters("lm_head."));
    return ps;
  }
  // The dense parameters (embedding, norms, head): replicated on every rank of a distributed run, so the
  // trainer averages their gradients over the shards itself; the MoE layers do theirs (sync_gradients).
  std::vector<moekit::Parameter<T>> dense_parameters() {
    std::vector<moekit::Parameter<T>> ps;
    auto add = [&](std::vector<moekit::Parameter<T>> more) { ps.insert(ps.end(), more.begin(), more.end()); };
    add(embed_.parameters("embed."));
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) add(norms_[l].parameters("blocks." + std::to_string(l) + ".norm."));
    add(final_norm_.parameters("norm."));
    add(head_.parameters("lm_head."));
    return ps;
  }
  // The MoE layers' router states (checkpoints).
  std::vector<std::vector<double>> router_states() const {
    std::vector<std::vector<double>> s;
    for (const auto& m : moes_) s.push_back(m->router_state());
    return s;
  }
  void set_router_states(const std::vector<std::vector<double>>& s) {
    if (s.size() != moes_.size())
      throw moekit::FormatError("router_states: " + std::to_string(s.size()) + " layers in the checkpoint, the model has " +
                                std::to_string(moes_.size()));
    for (std::size_t l = 0; l < s.size(); ++l) moes_[l]->set_router_state(s[l]);
  }
  // Distributed layers: average the MoE gradients over the shards (collective; once per optimizer step).
  void sync_moe_gradients() {
    for (auto& m : moes_) m->sync_gradients();
  }
  // CUDA layers: their parameter groups (the trainer clips and steps them on the device).
  std::vector<moekit::train::ParameterGroup*> parameter_groups(const moekit::train::AdamWConfig& ac) {
    std::vector<moekit::train::ParameterGroup*> gs;
    for (std::size_t l = 0; l < moes_.size(); ++l)
      if (auto* g = moes_[l]->parameter_group(ac)) {
        g->set_checkpoint_prefix("blocks." + std::to_string(l) + ".moe.");  // the names the host layers give them
        gs.push_back(g);
      }
    return gs;
  }
  // Every parameter, wherever it lives (shapes and shards: for counting).
  std::vector<moekit::Parameter<T>> parameter_shapes() {
    std::vector<moekit::Parameter<T>> ps = dense_parameters();
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      auto more = moes_[l]->parameter_shapes("blocks." + std::to_string(l) + ".moe.");
      ps.insert(ps.end(), more.begin(), more.end());
    }
    return ps;
  }
  void zero_grad() {
    embed_.zero_grad();
    for (auto& n : norms_) n.zero_grad();
    for (auto& m : moes_) m->zero_grad();
    final_norm_.zero_grad();
    head_.zero_grad();
  }

  // Forward of `rows` tokens: window ids [rows, W] (already offset by slot * vocab), targets [rows].
  // Returns the mean cross-entropy. With grad_scale > 0 it also prepares dlogits for backward(), and
  // window_ids must stay valid until then; token_loss [rows] (optional) receives each token's loss.
  double forward(const std::int32_t* window_ids, const std::int32_t* targets, std::int64_t rows, double grad_scale = 0.0,
                 T* token_loss = nullptr) {
    const std::int64_t d = cfg_.d_model, v = cfg_.vocab, L = cfg_.blocks;
    resize(rows);
    ids_ = Matrix<const std::int32_t>(window_ids, {rows, cfg_.context});
    embed_.forward(ids_, mat(h_[0]));
    for (std::int64_t l = 0; l < L; ++l) {
      norms_[l].forward(cmat(h_[l]), mat(xn_[l]));
      // Gating residual: block l's router adds W_g * (block l-1's logits); the first block has none.
      const bool residual = cfg_.gating_residual && l > 0;
      aux_[l] = moes_[l]->forward(cmat(xn_[l]), mat(mo_[l]), residual ? moes_[l - 1]->logits() : Matrix<const T>{});
      T* next = h_[l + 1].data();
      const T* prev = h_[l].data();
      const T* out = mo_[l].data();
      for (std::int64_t i = 0; i < rows * d; ++i) next[i] = prev[i] + out[i];  // too little work to share
    }
    final_norm_.forward(cmat(h_[L]), mat(hf_));
    head_.forward(cmat(hf_), Matrix<T>(logits_.data(), {rows, v}));
    return moekit::nn::softmax_cross_entropy<T>(
        Matrix<const T>(logits_.data(), {rows, v}), moekit::VectorView<const std::int32_t>(targets, {rows}),
        grad_scale > 0 ? Matrix<T>(dlogits_.data(), {rows, v}) : Matrix<T>{},
        moekit::VectorView<T>(token_loss, {token_loss ? rows : 0}), grad_scale);
  }

  // Backward of the last forward (which must have had grad_scale > 0). Gradients accumulate;
  // aux_scale weighs the MoE balance losses (1/m under m accumulated micro-batches, like dlogits).
  void backward(double aux_scale) {
    const std::int64_t rows = rows_, v = cfg_.vocab;
    head_.backward(cmat(hf_), Matrix<const T>(dlogits_.data(), {rows, v}), mat(dhf_));
    final_norm_.backward(cmat(h_[cfg_.blocks]), cmat(dhf_), mat(dh_));
    for (std::int64_t l = cfg_.blocks - 1; l >= 0; --l) {
      // h_{l+1} = h_l + MoE(norm(h_l)): dh_l = dh_{l+1} + norm'(MoE'(dh_{l+1})).
      // dlog_[l]: d loss / d (block l's logits) through block l+1's gating residual, written by block
      // l+1's backward (which runs first) and read by block l's.
      const bool has_next = cfg_.gating_residual && l + 1 < cfg_.blocks, has_prev = cfg_.gating_residual && l > 0;
      moes_[l]->backward(cmat(dh_), mat(dxn_), aux_scale, has_next ? lmat(dlog_[l]) : Matrix<const T>{},
                         has_prev ? Matrix<T>(dlog_[l - 1].data(), {rows_, n_experts_}) : Matrix<T>{});
      norms_[l].backward(cmat(h_[l]), cmat(dxn_), mat(dtmp_));
      T* dh = dh_.data();
      const T* dt = dtmp_.data();
      for (std::int64_t i = 0; i < rows * cfg_.d_model; ++i) dh[i] += dt[i];
    }
    embed_.backward(ids_, cmat(dh_));
  }

  // Aux losses of block l in the last forward (unscaled).
  moekit::AuxLosses aux(std::int64_t l) const { return aux_[l]; }

 private:
  void resize(std::int64_t rows) {
    rows_ = rows;
    const std::int64_t n = rows * cfg_.d_model, L = cfg_.blocks;
    if (std::int64_t(hf_.size()) >= n) return;  // buffers only grow
    h_.assign(L + 1, std::vector<T>(n));
    xn_.assign(L, std::vector<T>(n));
    mo_.assign(L, std::vector<T>(n));
    aux_.assign(L, {});
    for (auto* b : {&hf_, &dhf_, &dh_, &dxn_, &dtmp_}) b->assign(n, T(0));
    n_experts_ = cfg_.total_experts();
    if (cfg_.gating_residual) dlog_.assign(L, std::vector<T>(rows * n_experts_, T(0)));
    logits_.assign(rows * cfg_.vocab, T(0));
    dlogits_.assign(rows * cfg_.vocab, T(0));
  }
  Matrix<T> mat(std::vector<T>& b) const { return {b.data(), {rows_, cfg_.d_model}}; }
  Matrix<const T> cmat(const std::vector<T>& b) const { return {b.data(), {rows_, cfg_.d_model}}; }
  Matrix<const T> lmat(const std::vector<T>& b) const { return {b.data(), {rows_, n_experts_}}; }

  ModelConfig cfg_;
  moekit::nn::Embedding<T> embed_;
  std::vector<moekit::nn::RMSNorm<T>> norms_;
  std::vector<std::unique_ptr<MoeBlock<T>>> moes_;
  moekit::nn::RMSNorm<T> final_norm_;
  moekit::nn::Linear<T> head_;

  // Activations of the last forward (rows_ tokens) and the backward's scratch.
  std::int64_t rows_ = 0, n_experts_ = 0;
  Matrix<const std::int32_t> ids_;
  std::vector<std::vector<T>> h_, xn_, mo_, dlog_;
  std::vector<moekit::AuxLosses> aux_;
  std::vector<T> hf_, logits_, dlogits_, dhf_, dh_, dxn_, dtmp_;
};
