#pragma once
// Rotary position embedding (Su et al. 2021) in the "rotate half" layout of LLaMA and GPT-NeoX: in a head
// vector of hd values, pair i < hd/2 is (x[i], x[i + hd/2]) and turns by pos * theta^(-2i/hd).
// A rotation's gradient is the inverse rotation, so apply(..., inverse = true) is also the backward.
// Holds no parameters: only cos/sin tables, computed in double and stored in T.
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/core/error.hpp"

namespace moekit::nn {

template <class T = float>
class Rotary {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "nn::Rotary<T>: T must be float or double");

 public:
  using value_type = T;

  Rotary(std::int64_t head_dim, std::int64_t max_seq, double theta = 10000.0)
      : hd_(head_dim), half_(head_dim / 2), max_seq_(max_seq), theta_(theta) {
    if (head_dim <= 0) throw ConfigError("head_dim", std::to_string(head_dim), "must be > 0");
    if (head_dim % 2 != 0) throw ConfigError("head_dim", std::to_string(head_dim), "must be even");
    if (max_seq <= 0) throw ConfigError("max_seq", std::to_string(max_seq), "must be > 0");
    if (!std::isfinite(theta) || !(theta > 1.0)) throw ConfigError("theta", detail::str(theta), "must be finite and > 1");
    cos_.resize(max_seq_ * half_);
    sin_.resize(max_seq_ * half_);
    for (std::int64_t i = 0; i < half_; ++i) {
      const double freq = std::pow(theta_, -2.0 * double(i) / double(hd_));
      for (std::int64_t p = 0; p < max_seq_; ++p) {
        const double a = double(p) * freq;  // in double: at p ~ 1e4 a float angle would lose ~1e-3 rad
        cos_[p * half_ + i] = T(std::cos(a));
        sin_[p * half_ + i] = T(std::sin(a));
      }
    }
  }

  std::int64_t head_dim() const { return hd_; }
  std::int64_t max_seq() const { return max_seq_; }
  double theta() const { return theta_; }

  // Rotates in place rows = batch * seq token rows; row r (at x + r * row_stride, position r % seq) holds
  // `heads` consecutive head vectors of head_dim values. inverse turns by -angle (the backward).
  void apply(T* x, std::int64_t rows, std::int64_t seq, std::int64_t heads, std::int64_t row_stride,
             bool inverse = false) const {
    if (seq <= 0) throw ShapeError("rotary: seq = " + std::to_string(seq) + " must be > 0");
    if (seq > max_seq_)
      throw ShapeError("rotary: seq = " + std::to_string(seq) + " exceeds max_seq = " + std::to_string(max_seq_));
    if (rows < 0 || rows % seq != 0)
      throw ShapeError("rotary: rows = " + std::to_string(rows) + " is not a multiple of seq = " + std::to_string(seq));
    if (heads < 0 || row_stride < heads * hd_)
      throw ShapeError("rotary: row_stride = " + std::to_string(row_stride) + " is less than heads * head_dim = " +
                       std::to_string(heads) + " * " + std::to_string(hd_));
    if (rows > 0 && heads > 0 && x == nullptr) throw ShapeError("rotary: x is null");
    const T sign = inverse ? T(-1) : T(1);
#pragma omp parallel for schedule(static) if (rows * heads * hd_ > kParallelWork)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* c = cos_.data() + (r % seq) * half_;
      const T* s = sin_.data() + (r % seq) * half_;
      for (std::int64_t h = 0; h < heads; ++h) {
        T* lo = x + r * row_stride + h * hd_;
        T* hi = lo + half_;
        for (std::int64_t i = 0; i < half_; ++i) {
          const T a = lo[i], b = hi[i], si = sign * s[i];
          lo[i] = a * c[i] - b * si;
          hi[i] = a * si + b * c[i];
        }
      }
    }
  }

  // The tables [max_seq, head_dim / 2]: cos and sin of pos * theta^(-2i/hd) (nn/cuda uploads them).
  const std::vector<T>& cos_table() const { return cos_; }
  const std::vector<T>& sin_table() const { return sin_; }

 private:
  static constexpr std::int64_t kParallelWork = 1 << 15;

  std::int64_t hd_, half_, max_seq_;
  double theta_;
  std::vector<T> cos_, sin_;  // [max_seq, head_dim / 2]
};

}  // namespace moekit::nn
