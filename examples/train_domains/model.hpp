#pragma once
// The next-token model of train_domains, forward and backward written out layer by layer:
//
//   h_0     = sum_j E_j[token_{t-1-j}],  j = 0..W-1      one embedding table per window position
//   h_{l+1} = h_l + MoE_l(RMSNorm_l(h_l))                 residual MoE blocks
//   logits  = LMHead(RMSNorm_f(h_L))
//   loss    = cross-entropy(logits, token_t)
//
// The W position tables are stored as one [W * vocab, d_model] table and looked up as a bag:
// window slot j of token id v reads row j * vocab + v.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <moekit/moe_layer.hpp>
#include <moekit/nn/cross_entropy.hpp>
#include <moekit/nn/embedding.hpp>
#include <moekit/nn/linear.hpp>
#include <moekit/nn/rms_norm.hpp>

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
};

// T = float for training; the unit tests instantiate it in double for finite differences.
template <class T = float>
class Model {
 public:
  using Moe = moekit::MoeLayer<moekit::backend::Host<T>, moekit::router::TopK<moekit::router::Softmax>,
                               moekit::experts::Ffn<moekit::act::SwiGLU>>;
  template <class U>
  using Matrix = moekit::MatrixView<U>;

  Model(const ModelConfig& c, std::uint64_t seed)
      : cfg_(c), embed_(c.context * c.vocab, c.d_model), final_norm_(c.d_model), head_(c.d_model, c.vocab) {
    moekit::MoeConfig mc;
    mc.d_model = c.d_model;
    mc.d_expert = c.d_expert;
    mc.num_ffn_experts = c.experts;
    mc.top_k = c.top_k;
    mc.lbl_coef = c.lbl_coef;
    mc.zloss_coef = c.zloss_coef;
    for (std::int64_t l = 0; l < c.blocks; ++l) {
      norms_.emplace_back(c.d_model);
      moes_.emplace_back(mc);
      moes_.back().init_params(seed + 100 + std::uint64_t(l));
    }
    // Each position's rows have variance 1/W, so h_0 (a sum of W of them) starts with unit RMS.
    embed_.init_params(seed + 1, std::sqrt(3.0 / double(c.context)));
    head_.init_params(seed + 2);
  }

  const ModelConfig& config() const { return cfg_; }
  Moe& moe(std::int64_t l) { return moes_[l]; }

  std::vector<moekit::Parameter<T>> parameters() {
    std::vector<moekit::Parameter<T>> ps;
    auto add = [&](std::vector<moekit::Parameter<T>> more) { ps.insert(ps.end(), more.begin(), more.end()); };
    add(embed_.parameters("embed."));
    for (std::int64_t l = 0; l < cfg_.blocks; ++l) {
      const std::string p = "blocks." + std::to_string(l) + ".";
      add(norms_[l].parameters(p + "norm."));
      add(moes_[l].parameters(p + "moe."));
    }
    add(final_norm_.parameters("norm."));
    add(head_.parameters("lm_head."));
    return ps;
  }
  void zero_grad() {
    embed_.zero_grad();
    for (auto& n : norms_) n.zero_grad();
    for (auto& m : moes_) m.zero_grad();
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
      aux_[l] = moes_[l].forward(cmat(xn_[l]), mat(mo_[l]));
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
      moes_[l].backward(cmat(dh_), mat(dxn_), aux_scale);
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
    logits_.assign(rows * cfg_.vocab, T(0));
    dlogits_.assign(rows * cfg_.vocab, T(0));
  }
  Matrix<T> mat(std::vector<T>& b) const { return {b.data(), {rows_, cfg_.d_model}}; }
  Matrix<const T> cmat(const std::vector<T>& b) const { return {b.data(), {rows_, cfg_.d_model}}; }

  ModelConfig cfg_;
  moekit::nn::Embedding<T> embed_;
  std::vector<moekit::nn::RMSNorm<T>> norms_;
  std::vector<Moe> moes_;
  moekit::nn::RMSNorm<T> final_norm_;
  moekit::nn::Linear<T> head_;

  // Activations of the last forward (rows_ tokens) and the backward's scratch.
  std::int64_t rows_ = 0;
  Matrix<const std::int32_t> ids_;
  std::vector<std::vector<T>> h_, xn_, mo_;
  std::vector<moekit::AuxLosses> aux_;
  std::vector<T> hf_, logits_, dlogits_, dhf_, dh_, dxn_, dtmp_;
};
