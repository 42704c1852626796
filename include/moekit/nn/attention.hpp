#pragma once
// Causal multi-head self-attention with rotary positions (LLaMA's attention, no biases) and grouped-query
// attention: query head h reads kv group h / (heads / kv_heads); kv_heads = heads is plain MHA, 1 is MQA.
//   qkv = x Wqkv^T          one GEMM; columns: heads q vectors, then kv_heads k, then kv_heads v
//   q, k <- RoPE(q, k)      in place (nn::Rotary)
//   P_bh = softmax_causal(q_bh k_bg^T / sqrt(hd)),  out_bh = P_bh v_bg
//   y = out Wo^T
// set_precision(kBf16) (T = float) runs all eight products (two projections, the scores and P v, and
// their backwards) on bf16-rounded operands with fp32 accumulation; softmax and RoPE stay fp32.
// Unlike Linear it keeps its activations (post-RoPE qkv, every P, out) for the backward, in member
// buffers that only grow: backward() is the backward of the last forward().
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/backend/host/matmul.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/nn/linear.hpp"
#include "moekit/nn/rotary.hpp"

namespace moekit::nn {

template <class T = float>
class CausalSelfAttention {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "nn::CausalSelfAttention<T>: T must be float or double");

 public:
  using value_type = T;

  CausalSelfAttention(std::int64_t d_model, std::int64_t heads, std::int64_t kv_heads, std::int64_t max_seq,
                      double rope_theta = 10000.0)
      : d_(check_config(d_model, heads, kv_heads, max_seq, rope_theta)),
        h_(heads),
        kv_(kv_heads),
        hd_(d_model / heads),
        width_((heads + 2 * kv_heads) * hd_),
        max_seq_(max_seq),
        qkv_proj_(d_model, width_, false),
        o_proj_(heads * hd_, d_model, false),
        rope_(hd_, max_seq, rope_theta) {}

  std::int64_t d_model() const { return d_; }
  std::int64_t heads() const { return h_; }
  std::int64_t kv_heads() const { return kv_; }
  std::int64_t head_dim() const { return hd_; }
  std::int64_t max_seq() const { return max_seq_; }
  Linear<T>& qkv_proj() { return qkv_proj_; }
  Linear<T>& o_proj() { return o_proj_; }

  void set_precision(backend::host::MatmulPrecision p) {
    precision_ = backend::host::checked_precision<T>(p, "nn::CausalSelfAttention");
    qkv_proj_.set_precision(p);
    o_proj_.set_precision(p);
  }
  backend::host::MatmulPrecision precision() const { return precision_; }

  // Wqkv ~ U(±1/sqrt(d_model)) (torch's default) from `seed`; Wo ~ U(±out_scale/sqrt(heads*hd)) from
  // seed + 1 (out_scale < 1 damps a residual branch at init, as GPT-2 does by 1/sqrt(2 * layers)).
  void init_params(std::uint64_t seed, double out_scale = 1.0) {
    if (!std::isfinite(out_scale) || !(out_scale > 0.0))
      throw ConfigError("out_scale", detail::str(out_scale), "must be finite and > 0");
    qkv_proj_.init_params(seed);
    o_proj_.init_params(seed + 1, out_scale / std::sqrt(double(h_ * hd_)));
  }
  void zero_grad() {
    qkv_proj_.zero_grad();
    o_proj_.zero_grad();
  }

  std::vector<Parameter<T>> parameters(const std::string& prefix = "") {
    auto ps = qkv_proj_.parameters(prefix + "qkv_proj.");
    for (auto& p : o_proj_.parameters(prefix + "o_proj.")) ps.push_back(std::move(p));
    return ps;
  }

  // x [batch * seq, d_model], row b * seq + s = position s of sequence b; y [batch * seq, d_model]
  // (overwritten, must not alias x: backward reads x again).
  void forward(MatrixView<const T> x, std::int64_t seq, MatrixView<T> y) {
    const std::int64_t rows = x.shape[0];
    check_shape(x, "x", {rows, d_});
    check_shape(y, "y", {rows, d_});
    check_seq(rows, seq);
    has_forward_ = false;  // until it completes: a throw below leaves no stale state to backward through
    const std::int64_t batch = rows / seq, hdim = h_ * hd_;
    grow(qkv_, rows * width_);
    grow(probs_, batch * h_ * seq * seq);
    grow(out_, rows * hdim);

    qkv_proj_.forward(x, MatrixView<T>(qkv_.data(), {rows, width_}));
    rope_.apply(qkv_.data(), rows, seq, h_ + kv_, width_);  // q heads and k groups are adjacent columns

    const T scale = T(1) / std::sqrt(T(hd_));
    const std::int64_t group = h_ / kv_, pairs = batch * kv_;
    // One (sequence, kv group) per iteration: the BLAS calls inside run single-threaded on each thread.
#pragma omp parallel for schedule(static) if (batch * h_ * seq * seq * hd_ > kParallelWork)
    for (std::int64_t pg = 0; pg < pairs; ++pg) {
      const std::int64_t b = pg / kv_, g = pg % kv_;
      const T* base = qkv_.data() + b * seq * width_;
      const T* k = base + (h_ + g) * hd_;
      const T* v = base + (h_ + kv_ + g) * hd_;
      for (std::int64_t h = g * group; h < (g + 1) * group; ++h) {
        T* p = probs_.data() + (b * h_ + h) * seq * seq;
        backend::host::matmul<T>(precision_, false, true, seq, seq, hd_, scale, base + h * hd_, width_, k, width_, T(0), p, seq);
        causal_softmax(p, seq);
        backend::host::matmul<T>(precision_, false, false, seq, hd_, seq, T(1), p, seq, v, width_, T(0),
                               out_.data() + b * seq * hdim + h * hd_, hdim);
      }
    }
    o_proj_.forward(MatrixView<const T>(out_.data(), {rows, hdim}), y);
    rows_ = rows;
    seq_ = seq;
    has_forward_ = true;
  }

  // Backward of the last forward (x must be its input): Wqkv and Wo gradients accumulate (+=);
  // dx [batch * seq, d_model] is overwritten (an empty view skips it, as in Linear).
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx) {
    if (!has_forward_) throw ShapeError("attention backward: no forward to go back through");
    const std::int64_t rows = x.shape[0];
    if (rows != rows_)
      throw ShapeError("attention backward: x has " + std::to_string(rows) + " rows, the last forward had " +
                       std::to_string(rows_));
    check_shape(x, "x", {rows_, d_});
    check_shape(dy, "dy", {rows_, d_});
    if (dx.data != nullptr) check_shape(dx, "dx", {rows_, d_});  // before any gradient accumulates
    const std::int64_t seq = seq_, batch = rows / seq, hdim = h_ * hd_;
    const std::int64_t group = h_ / kv_, pairs = batch * kv_;
    const int threads = omp_get_max_threads();
    grow(dout_, rows * hdim);
    grow(dqkv_, rows * width_);
    grow(dprobs_, std::int64_t(threads) * seq * seq);  // one [seq, seq] per thread

    // d_out = dy Wo, dWo += dy^T out.
    o_proj_.backward(MatrixView<const T>(out_.data(), {rows, hdim}), dy, MatrixView<T>(dout_.data(), {rows, hdim}));

    const T scale = T(1) / std::sqrt(T(hd_));
    // A thread owns a (sequence, kv group): the group's dk, dv sum its heads in head order, whatever the
    // thread count, and no two threads write the same rows or columns.
#pragma omp parallel for schedule(static) if (batch * h_ * seq * seq * hd_ > kParallelWork)
    for (std::int64_t pg = 0; pg < pairs; ++pg) {
      const std::int64_t b = pg / kv_, g = pg % kv_;
      const T* base = qkv_.data() + b * seq * width_;
      const T* k = base + (h_ + g) * hd_;
      const T* v = base + (h_ + kv_ + g) * hd_;
      T* dbase = dqkv_.data() + b * seq * width_;
      T* dk = dbase + (h_ + g) * hd_;
      T* dv = dbase + (h_ + kv_ + g) * hd_;
      for (std::int64_t s = 0; s < seq; ++s) {
        std::fill_n(dk + s * width_, hd_, T(0));
        std::fill_n(dv + s * width_, hd_, T(0));
      }
      T* dp = dprobs_.data() + std::int64_t(omp_get_thread_num()) * seq * seq;
      for (std::int64_t h = g * group; h < (g + 1) * group; ++h) {
        const T* p = probs_.data() + (b * h_ + h) * seq * seq;
        const T* q = base + h * hd_;
        const T* dout = dout_.data() + b * seq * hdim + h * hd_;
        // dP = d_out v^T; dv += P^T d_out.
        backend::host::matmul<T>(precision_, false, true, seq, seq, hd_, T(1), dout, hdim, v, width_, T(0), dp, seq);
        backend::host::matmul<T>(precision_, true, false, seq, hd_, seq, T(1), p, seq, dout, hdim, T(1), dv, width_);
        causal_softmax_backward(p, dp, seq, scale);  // dp becomes dS (scaled by 1/sqrt(hd))
        // dq = dS k (overwritten: each q head is one thread's); dk += dS^T q.
        backend::host::matmul<T>(precision_, false, false, seq, hd_, seq, T(1), dp, seq, k, width_, T(0), dbase + h * hd_, width_);
        backend::host::matmul<T>(precision_, true, false, seq, hd_, seq, T(1), dp, seq, q, width_, T(1), dk, width_);
      }
    }
    rope_.apply(dqkv_.data(), rows, seq, h_ + kv_, width_, /*inverse=*/true);
    qkv_proj_.backward(x, MatrixView<const T>(dqkv_.data(), {rows, width_}), dx);
  }

  // Runs before any member is built, so a bad config never reaches Linear's or Rotary's own checks
  // (public: nn/cuda/attention.cuh checks its config with the same rules). Returns d_model.
  static std::int64_t check_config(std::int64_t d_model, std::int64_t heads, std::int64_t kv_heads, std::int64_t max_seq,
                                   double rope_theta) {
    if (d_model <= 0) throw ConfigError("d_model", std::to_string(d_model), "must be > 0");
    if (heads <= 0) throw ConfigError("heads", std::to_string(heads), "must be > 0");
    if (kv_heads < 1) throw ConfigError("kv_heads", std::to_string(kv_heads), "must be >= 1");
    if (d_model % heads != 0)
      throw ConfigError("d_model", std::to_string(d_model), "must be a multiple of heads = " + std::to_string(heads));
    if (heads % kv_heads != 0)
      throw ConfigError("heads", std::to_string(heads), "must be a multiple of kv_heads = " + std::to_string(kv_heads));
    if ((d_model / heads) % 2 != 0)
      throw ConfigError("head_dim", std::to_string(d_model / heads), "must be even (d_model / heads, for RoPE)");
    if (max_seq <= 0) throw ConfigError("max_seq", std::to_string(max_seq), "must be > 0");
    if (!std::isfinite(rope_theta) || !(rope_theta > 1.0))
      throw ConfigError("rope_theta", detail::str(rope_theta), "must be finite and > 1");
    return d_model;
  }

 private:
  static constexpr std::int64_t kParallelWork = 1 << 15;

  void check_seq(std::int64_t rows, std::int64_t seq) const {
    if (seq <= 0) throw ShapeError("attention: seq = " + std::to_string(seq) + " must be > 0");
    if (seq > max_seq_)
      throw ShapeError("attention: seq = " + std::to_string(seq) + " exceeds max_seq = " + std::to_string(max_seq_));
    if (rows % seq != 0)
      throw ShapeError("attention: x has " + std::to_string(rows) + " rows, not a multiple of seq = " +
                       std::to_string(seq));
  }

  static void grow(std::vector<T>& v, std::int64_t n) {
    if (std::int64_t(v.size()) < n) v.resize(n);
  }

  // Row i: softmax over j <= i (max subtracted first); j > i set to exactly 0.
  static void causal_softmax(T* p, std::int64_t seq) {
    for (std::int64_t i = 0; i < seq; ++i) {
      T* r = p + i * seq;
      T m = r[0];
      for (std::int64_t j = 1; j <= i; ++j) m = std::max(m, r[j]);
      T sum = 0;
      for (std::int64_t j = 0; j <= i; ++j) sum += (r[j] = std::exp(r[j] - m));
      const T inv = T(1) / sum;
      for (std::int64_t j = 0; j <= i; ++j) r[j] *= inv;
      std::fill(r + i + 1, r + seq, T(0));
    }
  }

  // dS_ij = P_ij (dP_ij - sum_k dP_ik P_ik) * scale for j <= i, else 0; in place over dP.
  static void causal_softmax_backward(const T* p, T* dp, std::int64_t seq, T scale) {
    for (std::int64_t i = 0; i < seq; ++i) {
      const T* pr = p + i * seq;
      T* dr = dp + i * seq;
      T dot = 0;
      for (std::int64_t j = 0; j <= i; ++j) dot += dr[j] * pr[j];
      for (std::int64_t j = 0; j <= i; ++j) dr[j] = pr[j] * (dr[j] - dot) * scale;
      std::fill(dr + i + 1, dr + seq, T(0));
    }
  }

  std::int64_t d_, h_, kv_, hd_, width_, max_seq_;
  backend::host::MatmulPrecision precision_ = backend::host::MatmulPrecision::kNative;
  Linear<T> qkv_proj_, o_proj_;
  Rotary<T> rope_;
  // The last forward's activations and the backward's scratch; sized to the largest call so far.
  std::vector<T> qkv_, probs_, out_;    // post-RoPE [N, width], P [batch*heads, seq, seq], [N, heads*hd]
  std::vector<T> dout_, dqkv_, dprobs_;  // [N, heads*hd], [N, width], [threads, seq, seq]
  std::int64_t rows_ = 0, seq_ = 0;
  bool has_forward_ = false;
};

}  // namespace moekit::nn
