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
// The MoE layers sit behind a virtual interface (../common/moe_block.hpp: MoeBlock) and come from a
// factory: by default make_moe_block (single-rank layers); ../common/ranks.hpp's factory gives the distributed host layers
// (--parallel), whose forward/backward communicate and whose parameters() list this rank's shard;
// cuda_blocks.hpp's gives CUDA layers (--backend cuda), whose parameters stay on the device as a
// train::ParameterGroup (parameter_groups()) that the trainer clips and steps there.
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <moekit/experts/granularity.hpp>
#include <moekit/moe_layer.hpp>
#include <moekit/nn/cross_entropy.hpp>
#include <moekit/nn/embedding.hpp>
#include <moekit/nn/linear.hpp>
#include <moekit/nn/rms_norm.hpp>
#include <moekit/train/adamw.hpp>
#include <moekit/train/parameter_group.hpp>

#include "../common/moe_block.hpp"

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

  // What the fields above leave to MoeConfig's defaults: the router and experts of the open models
  // (--router, --n-group, --activation, ...: MoeFlags::apply), which moe_config() starts from.
  moekit::MoeConfig base;

  // The config of each MoE layer (by default a softmax top-k router, SwiGLU experts, dropless).
  moekit::MoeConfig moe_config() const {
    moekit::MoeConfig mc = base;
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
