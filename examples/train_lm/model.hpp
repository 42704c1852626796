#pragma once
// train_lm's model: a decoder-only MoE transformer over bytes (as Mixtral, OLMoE or Qwen-MoE, small),
// forward and backward written out layer by layer. For a batch of B sequences of S bytes (N = B*S rows,
// row b*S + s is position s of sequence b):
//
//   h_0      = E[x]                                   token embedding [256, d]
//   block l:   u_l     = h_l + Attn_l(RMSNorm(h_l))     causal self-attention with rotary positions
//                                                      (grouped-query heads as an option)
//              h_{l+1} = u_l + MoE_l(RMSNorm(u_l))     (with gating residual: MoE_l's router also
//                                                      reads MoE_{l-1}'s logits)
//   logits   = RMSNorm(h_L) W^T                        W = E when the head is tied to the embedding
//   loss     = mean cross-entropy against the next byte
//
// --dense swaps each MoE layer for one FFN expert of width top_k * d_expert with top-1 routing and no
// balance losses: the same active parameters per token, computed by the same layer code (the router's
// single-expert softmax is 1, so its weights get no gradient and the output is the FFN's).
//
// The MoE layers sit behind ../common/moe_block.hpp's MoeBlock and come from a factory (single-rank host
// layers, bf16 host layers, or ../common/ranks.hpp's distributed ones); everything else is nn/ modules.
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <moekit/backend/host/matmul.hpp>
#include <moekit/moe_layer.hpp>
#include <moekit/nn/attention.hpp>
#include <moekit/nn/cross_entropy.hpp>
#include <moekit/nn/embedding.hpp>
#include <moekit/nn/linear.hpp>
#include <moekit/nn/rms_norm.hpp>
#include <moekit/science/flops.hpp>

#include "../common/moe_block.hpp"

struct LmConfig {
  static constexpr std::int64_t kVocab = 256;  // bytes
  std::int64_t seq = 128;                      // context length (and the rotary table's size)
  std::int64_t d_model = 64;
  std::int64_t heads = 4, kv_heads = 4;  // kv_heads < heads: grouped-query attention
  std::int64_t blocks = 2;
  bool tie_embeddings = false;
  double rope_theta = 10000.0;
  bool dense = false;  // one FFN of top_k * d_expert per block instead of the MoE layer
  moekit::MoeConfig moe;  // d_model is overwritten with the model's; the parallel degrees with the run's
  bool global_balance = false;

  // The config of each block's FFN layer: the MoE layer, or (--dense) its one-expert form.
  moekit::MoeConfig layer_config() const {
    moekit::MoeConfig mc = moe;
    mc.d_model = d_model;
    if (dense) {
      mc.d_expert = moe.top_k * moe.d_expert;
      mc.num_ffn_experts = 1, mc.top_k = 1;
      mc.num_zero_experts = mc.num_copy_experts = mc.num_constant_experts = 0;
      mc.gating_residual = false, mc.expert_bias = false;
      mc.lbl_coef = 0, mc.zloss_coef = 0, mc.capacity_factor = 0;
    }
    return mc;
  }

  // The model FLOPs of one micro-batch of `batch` sequences (science/flops.hpp: matrix products only,
  // the causal pairs of attention, top_k slots per token through FFN experts: the nominal count, which
  // MoE++ experts and a capacity limit lower in practice; shared experts are a SwiGLU FFN on every
  // token). The embedding is a lookup: no FLOPs.
  moekit::science::Flops flops(std::int64_t batch) const {
    namespace sc = moekit::science;
    const moekit::MoeConfig mc = layer_config();
    const std::int64_t rows = batch * seq, shared = moekit::read_options<moekit::experts::SharedOptions>(mc).width(mc);
    sc::Flops f;
    for (std::int64_t l = 0; l < blocks; ++l) {
      f += sc::attention_flops(batch, seq, d_model, heads, kv_heads) +
           sc::moe_flops(rows, d_model, mc.d_expert, mc.num_experts(), rows * mc.top_k, moekit::is_gated(mc.activation));
      if (shared > 0) f += sc::ffn_flops(rows, d_model, shared, /*gated=*/true);
    }
    return f + sc::linear_flops(rows, d_model, kVocab);
  }
};

// The initial values: each module's seed (from the run's) and scale, for both backends (cuda_lm.cu
// builds the same model on the GPU from the host modules' values), and the parameters' names.
struct LmInit {
  static std::uint64_t embed(std::uint64_t s) { return s + 1; }
  static std::uint64_t head(std::uint64_t s) { return s + 2; }
  static std::uint64_t moe(std::uint64_t s, std::int64_t l) { return s + 100 + std::uint64_t(l); }
  static std::uint64_t attention(std::uint64_t s, std::int64_t l) { return s + 200 + std::uint64_t(l); }
  static double embed_bound() { return 0.02 * std::sqrt(3.0); }  // std 0.02, as GPT-2 and LLaMA
  // GPT-2: residual branches start small.
  static double out_scale(std::int64_t blocks) { return 1.0 / std::sqrt(2.0 * double(blocks)); }
  static std::string block_prefix(std::int64_t l) { return "blocks." + std::to_string(l) + "."; }
};

// T = float for training; the unit tests instantiate it in double for finite differences.
template <class T = float>
class LmModel {
 public:
  template <class U>
  using Matrix = moekit::MatrixView<U>;

  // factory: how the MoE layers are made (empty: make_moe_block, single-rank host layers). Every rank of
  // a distributed run initialises the same full model from `seed` and keeps its shard of the experts.
  LmModel(const LmConfig& c, std::uint64_t seed, const MoeBlockFactory<T>& factory = {})
      : cfg_(c), mc_(c.layer_config()), embed_(LmConfig::kVocab, c.d_model), final_norm_(c.d_model) {
    if (!c.tie_embeddings) head_ = std::make_unique<moekit::nn::Linear<T>>(c.d_model, LmConfig::kVocab, false);
    for (std::int64_t l = 0; l < c.blocks; ++l) {
      attn_norms_.emplace_back(c.d_model);
      attns_.emplace_back(c.d_model, c.heads, c.kv_heads, c.seq, c.rope_theta);
      attns_.back().init_params(LmInit::attention(seed, l), LmInit::out_scale(c.blocks));
      moe_norms_.emplace_back(c.d_model);
      moes_.push_back(factory ? factory(mc_, c.global_balance) : make_moe_block<T>(mc_, c.global_balance));
      moes_.back()->init_params(LmInit::moe(seed, l));
    }
    embed_.init_params(LmInit::embed(seed), LmInit::embed_bound());
    if (head_) head_->init_params(LmInit::head(seed));
  }

  const LmConfig& config() const { return cfg_; }
  const moekit::MoeConfig& layer_config() const { return mc_; }
  MoeBlock<T>& moe(std::int64_t l) { return *moes_[l]; }
  std::int64_t total_experts() const { return mc_.num_experts(); }
  void end_step() {
    for (auto& m : moes_) m->end_step();
  }
  void set_training(bool on) {
    for (auto& m : moes_) m->set_training(on);
  }
  // --dtype bf16 on the host: the dense products (attention's eight, the LM head's) on bf16-rounded
  // operands with fp32 accumulation; the parameters stay fp32 (the AdamW masters), as do norms, softmax,
  // RoPE, the residual stream and the loss (backend/host/matmul.hpp). The MoE layers choose their own.
  void set_matmul_precision(moekit::backend::host::MatmulPrecision p) {
    precision_ = moekit::backend::host::checked_precision<T>(p, "LmModel");
    for (auto& a : attns_) a.set_precision(p);
    if (head_) head_->set_precision(p);
  }
  moekit::backend::host::MatmulPrecision matmul_precision() const { return precision_; }

  // The dense parameters (embedding, attention, norms, head): replicated on every rank of a distributed
  // run, so the trainer averages their gradients over the shards; the MoE layers sync theirs.
  std::vector<moekit::Parameter<T>> dense_parameters() { return collect(false); }
  // This rank's host parameters, in checkpoint order.
  std::vector<moekit::Parameter<T>> parameters() { return collect(true); }
  // Every parameter, wherever it lives (shapes and shards: for counting).
  std::vector<moekit::Parameter<T>> parameter_shapes() {
    std::vector<moekit::Parameter<T>> ps = dense_parameters();
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      auto more = moes_[l]->parameter_shapes(block_prefix(l) + "moe.");
      ps.insert(ps.end(), more.begin(), more.end());
    }
    return ps;
  }
  // Layers whose parameters live outside the host optimizer (--dtype bf16: fp32 masters in a group).
  std::vector<moekit::train::ParameterGroup*> parameter_groups(const moekit::train::AdamWConfig& ac) {
    std::vector<moekit::train::ParameterGroup*> gs;
    for (std::int64_t l = 0; l < cfg_.blocks; ++l)
      if (auto* g = moes_[l]->parameter_group(ac)) {
        g->set_checkpoint_prefix(block_prefix(l) + "moe.");
        gs.push_back(g);
      }
    return gs;
  }
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
  void sync_moe_gradients() {
    for (auto& m : moes_) m->sync_gradients();
  }
  void zero_grad() {
    embed_.zero_grad();
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      attn_norms_[l].zero_grad(), attns_[l].zero_grad(), moe_norms_[l].zero_grad();
      moes_[l]->zero_grad();
    }
    final_norm_.zero_grad();
    if (head_) head_->zero_grad();
  }

  // Forward of `batch` sequences of `seq` bytes (inputs: [batch * seq] ids, which must stay valid until
  // backward()). Leaves the logits [batch * seq, 256] for loss() or for sampling.
  void forward(const std::int32_t* inputs, std::int64_t batch, std::int64_t seq) {
    if (seq < 1 || seq > cfg_.seq)
      throw moekit::ShapeError("LmModel::forward: seq = " + std::to_string(seq) + " must be in [1, " + std::to_string(cfg_.seq) + "]");
    resize(batch * seq);
    seq_ = seq;
    ids_ = Matrix<const std::int32_t>(inputs, {rows_, 1});
    embed_.forward(ids_, mat(h_[0]));
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      attn_norms_[l].forward(cmat(h_[l]), mat(an_[l]));
      attns_[l].forward(cmat(an_[l]), seq, mat(tmp_));
      add(h_[l], tmp_, u_[l]);
      moe_norms_[l].forward(cmat(u_[l]), mat(mn_[l]));
      const bool residual = mc_.gating_residual && l > 0;  // block l's router adds W_g * (block l-1's logits)
      aux_[l] = moes_[l]->forward(cmat(mn_[l]), mat(tmp_), residual ? moes_[l - 1]->logits() : Matrix<const T>{});
      add(u_[l], tmp_, h_[l + 1]);
    }
    final_norm_.forward(cmat(h_[cfg_.blocks]), mat(hf_));
    const std::int64_t d = cfg_.d_model, v = LmConfig::kVocab;
    if (head_) head_->forward(cmat(hf_), logits());
    else moekit::backend::host::matmul<T>(precision_, false, true, rows_, v, d, T(1), hf_.data(), embed_.weight(), T(0), logits_.data());
  }
  Matrix<T> logits() { return {logits_.data(), {rows_, LmConfig::kVocab}}; }

  // Mean cross-entropy of the last forward against targets [rows]. grad_scale > 0 also prepares the
  // logits' gradient for backward(); token_loss [rows] (optional) receives each byte's loss.
  double loss(const std::int32_t* targets, double grad_scale = 0.0, T* token_loss = nullptr) {
    return moekit::nn::softmax_cross_entropy<T>(
        Matrix<const T>(logits_.data(), {rows_, LmConfig::kVocab}), moekit::VectorView<const std::int32_t>(targets, {rows_}),
        grad_scale > 0 ? Matrix<T>(dlogits_.data(), {rows_, LmConfig::kVocab}) : Matrix<T>{},
        moekit::VectorView<T>(token_loss, {token_loss ? rows_ : 0}), grad_scale);
  }

  // Backward of the last forward and loss (which must have had grad_scale > 0). Gradients accumulate;
  // aux_scale weighs the MoE balance losses (1/m under m accumulated micro-batches, like the logits').
  void backward(double aux_scale) {
    const std::int64_t d = cfg_.d_model, v = LmConfig::kVocab, L = cfg_.blocks;
    if (head_) {
      head_->backward(cmat(hf_), Matrix<const T>(dlogits_.data(), {rows_, v}), mat(dhf_));
    } else {  // logits = hf E^T: dE += dlogits^T hf, dhf = dlogits E
      moekit::backend::host::matmul<T>(precision_, true, false, v, d, rows_, T(1), dlogits_.data(), hf_.data(), T(1), embed_.grad());
      moekit::backend::host::matmul<T>(precision_, false, false, rows_, d, v, T(1), dlogits_.data(), embed_.weight(), T(0), dhf_.data());
    }
    final_norm_.backward(cmat(h_[L]), cmat(dhf_), mat(dh_));  // dh_ = d loss / d h_L
    for (std::int64_t l = L - 1; l >= 0; --l) {
      // h_{l+1} = u_l + MoE(norm(u_l)): du_l = dh_{l+1} + norm'(MoE'(dh_{l+1})). dlog_[l]: d loss / d
      // (block l's router logits) through block l+1's gating residual, written by block l+1's backward.
      const bool has_next = mc_.gating_residual && l + 1 < L, has_prev = mc_.gating_residual && l > 0;
      moes_[l]->backward(cmat(dh_), mat(dx_), aux_scale, has_next ? lmat(dlog_[l]) : Matrix<const T>{},
                         has_prev ? Matrix<T>(dlog_[l - 1].data(), {rows_, total_experts()}) : Matrix<T>{});
      moe_norms_[l].backward(cmat(u_[l]), cmat(dx_), mat(tmp_));
      accumulate(dh_, tmp_);
      // u_l = h_l + Attn(norm(h_l)): dh_l = du_l + norm'(Attn'(du_l)).
      attns_[l].backward(cmat(an_[l]), cmat(dh_), mat(dx_));
      attn_norms_[l].backward(cmat(h_[l]), cmat(dx_), mat(tmp_));
      accumulate(dh_, tmp_);
    }
    embed_.backward(ids_, cmat(dh_));
  }

  moekit::AuxLosses aux(std::int64_t l) const { return aux_[l]; }
  std::int64_t rows() const { return rows_; }

 private:
  static std::string block_prefix(std::int64_t l) { return LmInit::block_prefix(l); }

  std::vector<moekit::Parameter<T>> collect(bool with_moe) {
    std::vector<moekit::Parameter<T>> ps;
    auto add_all = [&](std::vector<moekit::Parameter<T>> more) { ps.insert(ps.end(), more.begin(), more.end()); };
    add_all(embed_.parameters("embed."));
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      const std::string p = block_prefix(l);
      add_all(attn_norms_[l].parameters(p + "attn_norm."));
      add_all(attns_[l].parameters(p + "attn."));
      add_all(moe_norms_[l].parameters(p + "moe_norm."));
      if (with_moe) add_all(moes_[l]->parameters(p + "moe."));
    }
    add_all(final_norm_.parameters("norm."));
    if (head_) add_all(head_->parameters("lm_head."));
    return ps;
  }

  void resize(std::int64_t rows) {
    rows_ = rows;
    const std::int64_t n = rows * cfg_.d_model, L = cfg_.blocks;
    if (std::int64_t(hf_.size()) >= n) return;  // buffers only grow
    h_.assign(L + 1, std::vector<T>(n));
    for (auto* b : {&an_, &u_, &mn_}) b->assign(L, std::vector<T>(n));
    aux_.assign(L, {});
    for (auto* b : {&hf_, &dhf_, &dh_, &dx_, &tmp_}) b->assign(n, T(0));
    if (mc_.gating_residual) dlog_.assign(L, std::vector<T>(rows * total_experts(), T(0)));
    logits_.assign(rows * LmConfig::kVocab, T(0));
    dlogits_.assign(rows * LmConfig::kVocab, T(0));
  }
  void add(const std::vector<T>& a, const std::vector<T>& b, std::vector<T>& out) const {
    const std::int64_t n = rows_ * cfg_.d_model;
    for (std::int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];  // too little work to share
  }
  void accumulate(std::vector<T>& into, const std::vector<T>& b) const {
    const std::int64_t n = rows_ * cfg_.d_model;
    for (std::int64_t i = 0; i < n; ++i) into[i] += b[i];
  }
  Matrix<T> mat(std::vector<T>& b) const { return {b.data(), {rows_, cfg_.d_model}}; }
  Matrix<const T> cmat(const std::vector<T>& b) const { return {b.data(), {rows_, cfg_.d_model}}; }
  Matrix<const T> lmat(const std::vector<T>& b) const { return {b.data(), {rows_, total_experts()}}; }

  LmConfig cfg_;
  moekit::MoeConfig mc_;
  moekit::backend::host::MatmulPrecision precision_ = moekit::backend::host::MatmulPrecision::kNative;
  moekit::nn::Embedding<T> embed_;
  std::vector<moekit::nn::RMSNorm<T>> attn_norms_, moe_norms_;
  std::vector<moekit::nn::CausalSelfAttention<T>> attns_;
  std::vector<std::unique_ptr<MoeBlock<T>>> moes_;
  moekit::nn::RMSNorm<T> final_norm_;
  std::unique_ptr<moekit::nn::Linear<T>> head_;  // null: tied to the embedding

  // Activations of the last forward (rows_ = batch * seq_ rows) and the backward's scratch.
  std::int64_t rows_ = 0, seq_ = 0;
  Matrix<const std::int32_t> ids_;
  std::vector<std::vector<T>> h_, an_, u_, mn_, dlog_;
  std::vector<moekit::AuxLosses> aux_;
  std::vector<T> hf_, logits_, dlogits_, dhf_, dh_, dx_, tmp_;
};
