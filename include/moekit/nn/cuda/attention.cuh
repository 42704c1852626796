#pragma once
// nn::cuda::CausalSelfAttention: nn::CausalSelfAttention on the device (fused QKV projection, RoPE in
// the rotate-half form, grouped-query heads, causal softmax, output projection; no biases), with the
// same parameters, names and initial values. Per head, the two forward and four backward products are
// cuBLAS strided-batched GEMMs over the batch's sequences, reading the heads in place from the fused
// [rows, (heads + 2 kv_heads) hd] buffer; the masked softmax and its backward are one warp per row
// (backend/cuda/nn_ops.cuh). Scores, dP and the QKV gradient are fp32 whatever T is; P, dS and the
// activations are in the storage type. Like the host module it keeps its activations (post-RoPE qkv,
// every P, the heads' output) for the backward of the last forward.
//
// Memory: P is heads · batch · seq² values of T, kept per layer; a long-context model wants a fused
// (flash) kernel instead, which this library does not have yet.
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/backend/cuda/activation.cuh"  // convert
#include "moekit/backend/cuda/nn_ops.cuh"
#include "moekit/nn/attention.hpp"
#include "moekit/nn/cuda/linear.cuh"
#include "moekit/nn/cuda/module.cuh"

namespace moekit::nn::cuda {
inline namespace MOEKIT_CUDA_ABI {

template <class T = float>
class CausalSelfAttention {
 public:
  using S = bc::storage_t<T>;
  static constexpr bool kF32 = std::is_same_v<S, float>;

  CausalSelfAttention(std::int64_t d_model, std::int64_t heads, std::int64_t kv_heads, std::int64_t max_seq, double rope_theta = 10000.0)
      : d_(moekit::nn::CausalSelfAttention<float>::check_config(d_model, heads, kv_heads, max_seq, rope_theta)),
        h_(heads),
        kv_(kv_heads),
        hd_(d_model / heads),
        width_((heads + 2 * kv_heads) * hd_),
        max_seq_(max_seq),
        qkv_proj_(d_model, width_),
        o_proj_(heads * hd_, d_model) {
    const moekit::nn::Rotary<float> rope(hd_, max_seq, rope_theta);  // the host tables (computed in double)
    cos_.resize(rope.cos_table().size()), sin_.resize(rope.sin_table().size());
    bc::copy_to_device(cos_.data(), rope.cos_table().data(), cos_.size() * sizeof(float));
    bc::copy_to_device(sin_.data(), rope.sin_table().data(), sin_.size() * sizeof(float));
  }

  std::int64_t d_model() const { return d_; }
  std::int64_t heads() const { return h_; }
  std::int64_t kv_heads() const { return kv_; }
  std::int64_t head_dim() const { return hd_; }
  std::int64_t max_seq() const { return max_seq_; }
  Linear<T>& qkv_proj() { return qkv_proj_; }
  Linear<T>& o_proj() { return o_proj_; }

  // The host module's values (its init_params gives this module's initial values).
  void load(moekit::nn::CausalSelfAttention<float>& host) {
    if (host.d_model() != d_ || host.heads() != h_ || host.kv_heads() != kv_)
      throw ShapeError("nn::cuda::CausalSelfAttention::load: the host module has another shape");
    qkv_proj_.load(host.qkv_proj());
    o_proj_.load(host.o_proj());
  }
  void zero_grad(cudaStream_t s) {
    qkv_proj_.zero_grad(s);
    o_proj_.zero_grad(s);
  }
  std::vector<DeviceParameter> parameters(const std::string& prefix = "") const {
    auto ps = qkv_proj_.parameters(prefix + "qkv_proj.");
    for (auto& p : o_proj_.parameters(prefix + "o_proj.")) ps.push_back(std::move(p));
    return ps;
  }

  // x [batch · seq, d_model] (row b · seq + s: position s of sequence b), y [rows, d_model]
  // (overwritten; must not alias x).
  void forward(const Context& ctx, const S* x, std::int64_t rows, std::int64_t seq, S* y) {
    check_seq(rows, seq);
    has_forward_ = false;
    const std::int64_t batch = rows / seq, hdim = h_ * hd_, group = h_ / kv_;
    grow(qkv_, rows * width_);
    grow(p_, h_ * batch * seq * seq);
    if constexpr (!kF32) grow(scores_, batch * seq * seq);
    grow(out_, rows * hdim);

    qkv_proj_.forward(ctx, x, rows, qkv_.data());
    MOEKIT_CUDA_CHECK(bc::rotary_apply(qkv_.data(), cos_.data(), sin_.data(), rows, seq, h_ + kv_, hd_, width_, false, ctx.stream));
    set_stream(ctx);
    const int S_ = int(seq), B = int(batch);
    const long long seq_rows = (long long)(seq) * width_, sq = (long long)(seq) * seq;
    for (std::int64_t h = 0; h < h_; ++h) {
      const std::int64_t g = h / group;
      S* p = p_.data() + h * batch * seq * seq;  // P of head h: [batch, seq, seq]
      float* scores;
      if constexpr (kF32) scores = p;  // softmax in place
      else scores = scores_.data();
      // scores_b = q_bh k_bg^T / sqrt(hd)
      bc::GemmSpec qk;
      qk.ta = false, qk.tb = true, qk.ab = bc::data_type<S>(), qk.c = CUDA_R_32F, qk.alpha = 1.f / std::sqrt(float(hd_));
      MOEKIT_CUBLAS_CHECK(bc::gemm_strided_batched_row_major(
          ctx.blas, qk, {S_, S_, int(hd_), qkv_.data() + h * hd_, int(width_), qkv_.data() + (h_ + g) * hd_, int(width_), scores, S_},
          seq_rows, seq_rows, sq, B));
      MOEKIT_CUDA_CHECK(bc::causal_softmax(scores, p, batch * seq, seq, ctx.stream));
      // out_bh = P_bh v_bg
      bc::GemmSpec pv;
      pv.ab = pv.c = bc::data_type<S>();
      MOEKIT_CUBLAS_CHECK(bc::gemm_strided_batched_row_major(ctx.blas, pv,
                                                             {S_, int(hd_), S_, p, S_, qkv_.data() + (h_ + kv_ + g) * hd_, int(width_),
                                                              out_.data() + h * hd_, int(hdim)},
                                                             sq, seq_rows, (long long)(seq) * hdim, B));
    }
    o_proj_.forward(ctx, out_.data(), rows, y);
    rows_ = rows, seq_ = seq;
    has_forward_ = true;
  }

  // Backward of the last forward (x its input): weight gradients accumulate; dx overwritten (null skips it).
  void backward(const Context& ctx, const S* x, const S* dy, std::int64_t rows, S* dx) {
    if (!has_forward_) throw ShapeError("attention backward: no forward to go back through");
    if (rows != rows_)
      throw ShapeError("attention backward: " + std::to_string(rows) + " rows, the last forward had " + std::to_string(rows_));
    const std::int64_t seq = seq_, batch = rows / seq, hdim = h_ * hd_, group = h_ / kv_;
    grow(dout_, rows * hdim);
    grow(dp_, batch * seq * seq);
    if constexpr (!kF32) grow(ds_, batch * seq * seq), grow(dqkv_s_, rows * width_);
    grow(dqkv_, rows * width_);

    o_proj_.backward(ctx, out_.data(), dy, rows, dout_.data());  // d_out = dy Wo, dWo += dy^T out
    set_stream(ctx);
    const int S_ = int(seq), B = int(batch);
    const long long seq_rows = (long long)(seq) * width_, sq = (long long)(seq) * seq, out_rows = (long long)(seq) * hdim;
    const float scale = 1.f / std::sqrt(float(hd_));
    const cudaDataType_t st = bc::data_type<S>();
    for (std::int64_t h = 0; h < h_; ++h) {
      const std::int64_t g = h / group;
      const bool first = h % group == 0;  // the group's first head overwrites dk, dv; the others add
      const S* p = p_.data() + h * batch * seq * seq;
      const S* q = qkv_.data() + h * hd_;
      const S* k = qkv_.data() + (h_ + g) * hd_;
      const S* v = qkv_.data() + (h_ + kv_ + g) * hd_;
      const S* dout = dout_.data() + h * hd_;
      float* dq = dqkv_.data() + h * hd_;
      float* dk = dqkv_.data() + (h_ + g) * hd_;
      float* dv = dqkv_.data() + (h_ + kv_ + g) * hd_;
      S* ds;
      if constexpr (kF32) ds = dp_.data();  // in place
      else ds = ds_.data();
      bc::GemmSpec spec;
      spec.ab = st, spec.c = CUDA_R_32F;
      // dP = d_out v^T
      spec.ta = false, spec.tb = true, spec.beta = 0.f;
      MOEKIT_CUBLAS_CHECK(bc::gemm_strided_batched_row_major(ctx.blas, spec, {S_, S_, int(hd_), dout, int(hdim), v, int(width_), dp_.data(), S_},
                                                             out_rows, seq_rows, sq, B));
      // dv (+)= P^T d_out
      spec.ta = true, spec.tb = false, spec.beta = first ? 0.f : 1.f;
      MOEKIT_CUBLAS_CHECK(bc::gemm_strided_batched_row_major(ctx.blas, spec, {S_, int(hd_), S_, p, S_, dout, int(hdim), dv, int(width_)},
                                                             sq, out_rows, seq_rows, B));
      MOEKIT_CUDA_CHECK(bc::causal_softmax_backward(p, dp_.data(), ds, batch * seq, seq, scale, ctx.stream));
      // dq = dS k (overwritten)
      spec.ta = false, spec.tb = false, spec.beta = 0.f;
      MOEKIT_CUBLAS_CHECK(bc::gemm_strided_batched_row_major(ctx.blas, spec, {S_, int(hd_), S_, ds, S_, k, int(width_), dq, int(width_)},
                                                             sq, seq_rows, seq_rows, B));
      // dk (+)= dS^T q
      spec.ta = true, spec.tb = false, spec.beta = first ? 0.f : 1.f;
      MOEKIT_CUBLAS_CHECK(bc::gemm_strided_batched_row_major(ctx.blas, spec, {S_, int(hd_), S_, ds, S_, q, int(width_), dk, int(width_)},
                                                             sq, seq_rows, seq_rows, B));
    }
    MOEKIT_CUDA_CHECK(bc::rotary_apply(dqkv_.data(), cos_.data(), sin_.data(), rows, seq, h_ + kv_, hd_, width_, true, ctx.stream));
    const S* dqkv;
    if constexpr (kF32) {
      dqkv = dqkv_.data();
    } else {
      MOEKIT_CUDA_CHECK(bc::convert(dqkv_.data(), dqkv_s_.data(), std::size_t(rows * width_), ctx.stream));
      dqkv = dqkv_s_.data();
    }
    qkv_proj_.backward(ctx, x, dqkv, rows, dx);
  }

 private:
  void check_seq(std::int64_t rows, std::int64_t seq) const {
    if (seq <= 0 || seq > max_seq_)
      throw ShapeError("attention: seq = " + std::to_string(seq) + " must be in [1, max_seq = " + std::to_string(max_seq_) + "]");
    if (rows < 0 || rows % seq != 0)
      throw ShapeError("attention: x has " + std::to_string(rows) + " rows, not a multiple of seq = " + std::to_string(seq));
    if (rows * width_ > (std::int64_t(1) << 31) - 1 || h_ * rows * seq > (std::int64_t(1) << 40))
      throw ShapeError("attention: " + std::to_string(rows) + " rows of seq " + std::to_string(seq) + " are too many for one call");
  }

  std::int64_t d_, h_, kv_, hd_, width_, max_seq_;
  Linear<T> qkv_proj_, o_proj_;
  bc::DeviceArray<float> cos_, sin_;  // [max_seq, hd / 2]
  // The last forward's activations and the backward's scratch (sized to the largest call so far).
  bc::DeviceArray<S> qkv_, p_, out_;  // post-RoPE [rows, width]; P [heads, batch, seq, seq]; [rows, heads·hd]
  bc::DeviceArray<float> scores_;     // bf16 only: one head's fp32 scores [batch, seq, seq]
  bc::DeviceArray<S> dout_, ds_, dqkv_s_;  // [rows, heads·hd]; bf16 only: dS, dqkv in S
  bc::DeviceArray<float> dp_, dqkv_;       // one head's dP (fp32: and dS) [batch, seq, seq]; [rows, width]
  std::int64_t rows_ = 0, seq_ = 0;
  bool has_forward_ = false;
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::nn::cuda
