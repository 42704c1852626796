#pragma once
// FLOPs of a training step, counted per layer from the shapes (docs/design.md §8): the matrix products only
// (2 FLOPs per multiply-add; norms, softmax, activations and the optimizer are left out, as in the
// model-FLOPs utilisation of PaLM and Megatron), forward and backward apart. A product with a weight
// costs 2·m·n·k forward and twice that backward (the input's gradient and the weight's); without an
// input gradient (the input is data) the backward is the weight's alone.
//
// These are the model's FLOPs, what utilisation is measured against: a kernel that computes more (the
// library's attention also multiplies the masked half of the scores) is not credited for the excess.
#include <cstdint>
#include <string>

#include "moekit/core/error.hpp"

namespace moekit::science {

struct Flops {
  double forward = 0, backward = 0;
  double total() const { return forward + backward; }
  Flops& operator+=(const Flops& o) {
    forward += o.forward, backward += o.backward;
    return *this;
  }
  friend Flops operator+(Flops a, const Flops& b) { return a += b; }
  friend Flops operator*(double s, Flops a) {
    a.forward *= s, a.backward *= s;
    return a;
  }
};

namespace detail {
inline void check_nonneg(std::int64_t v, const char* name) {
  if (v < 0) throw ConfigError(name, std::to_string(v), "must be >= 0");
}
inline void check_positive(std::int64_t v, const char* name) {
  if (v <= 0) throw ConfigError(name, std::to_string(v), "must be > 0");
}
}  // namespace detail

// y = x W^T over `rows` rows, W [out, in] (nn::Linear).
inline Flops linear_flops(std::int64_t rows, std::int64_t in, std::int64_t out, bool input_grad = true) {
  detail::check_nonneg(rows, "rows"), detail::check_nonneg(in, "in"), detail::check_nonneg(out, "out");
  const double f = 2.0 * double(rows) * double(in) * double(out);
  return {f, input_grad ? 2 * f : f};
}

// Causal self-attention over `batch` sequences of `seq` tokens (nn::CausalSelfAttention): the fused QKV
// projection to (heads + 2 kv_heads) head vectors of d_model / heads, q·k for each (query, key) pair
// with key <= query (seq (seq + 1) / 2 of them per sequence and head), P·V over the same pairs, and the
// output projection. The backward of the two attention products is twice their forward (dQ, dK from
// dS; dP, dV from dO), as for a weight product.
inline Flops attention_flops(std::int64_t batch, std::int64_t seq, std::int64_t d_model, std::int64_t heads, std::int64_t kv_heads) {
  detail::check_nonneg(batch, "batch"), detail::check_positive(seq, "seq"), detail::check_positive(d_model, "d_model");
  detail::check_positive(heads, "heads"), detail::check_positive(kv_heads, "kv_heads");
  if (d_model % heads != 0) throw ConfigError("d_model", std::to_string(d_model), "must be a multiple of heads = " + std::to_string(heads));
  const std::int64_t hd = d_model / heads, rows = batch * seq;
  Flops f = linear_flops(rows, d_model, (heads + 2 * kv_heads) * hd) + linear_flops(rows, heads * hd, d_model);
  const double pairs = double(batch) * double(heads) * double(seq) * double(seq + 1) / 2.0;
  const double products = 2 * (2.0 * pairs * double(hd));  // q·k and P·V
  f += Flops{products, 2 * products};
  return f;
}

// A dense FFN over `rows` rows, d_model -> d_ff -> d_model: three matrices when gated (SwiGLU), two
// otherwise (train_lm's --dense block).
inline Flops ffn_flops(std::int64_t rows, std::int64_t d_model, std::int64_t d_ff, bool gated = true) {
  detail::check_nonneg(rows, "rows"), detail::check_positive(d_model, "d_model"), detail::check_positive(d_ff, "d_ff");
  return double(gated ? 3 : 2) * linear_flops(rows, d_model, d_ff);
}

// Where a MoE layer's (token, expert) slots went. Zero and copy experts (MoE++) compute no product;
// a constant expert computes its mix [a1, a2] = softmax(W_c x), a product with W_c [2, d_model].
struct MoeSlots {
  std::int64_t ffn = 0, constant = 0;
};

// A MoE layer over `tokens` tokens (docs/design.md §8): the router (a product with [num_experts, d_model];
// with the gating residual also W_g [num_experts, num_experts] on the previous layer's logits, whose
// gradient flows back), `slots.ffn` rows through FFN experts of d_model -> d_expert -> d_model (6
// d·d_expert per slot forward when gated, 4 otherwise) and `slots.constant` constant-expert mixes.
// With top-k routing over FFN experts only and no capacity limit, slots.ffn = tokens · top_k.
inline Flops moe_flops(std::int64_t tokens, std::int64_t d_model, std::int64_t d_expert, std::int64_t num_experts, MoeSlots slots,
                       bool gated = true, bool gating_residual = false) {
  detail::check_nonneg(tokens, "tokens"), detail::check_positive(d_model, "d_model"), detail::check_positive(d_expert, "d_expert");
  detail::check_positive(num_experts, "num_experts"), detail::check_nonneg(slots.ffn, "ffn_slots");
  detail::check_nonneg(slots.constant, "constant_slots");
  Flops f = linear_flops(tokens, d_model, num_experts) + ffn_flops(slots.ffn, d_model, d_expert, gated) +
            linear_flops(slots.constant, d_model, 2);
  if (gating_residual) f += linear_flops(tokens, num_experts, num_experts);
  return f;
}
inline Flops moe_flops(std::int64_t tokens, std::int64_t d_model, std::int64_t d_expert, std::int64_t num_experts, std::int64_t ffn_slots,
                       bool gated = true) {
  return moe_flops(tokens, d_model, d_expert, num_experts, MoeSlots{ffn_slots, 0}, gated);
}

}  // namespace moekit::science
