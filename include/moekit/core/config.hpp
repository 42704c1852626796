#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "moekit/core/error.hpp"

namespace moekit {

enum class Activation { kSwiGLU, kGeLU, kReLU };
enum class RouterKind { kSoftmax, kSigmoid };

inline const char* to_string(Activation a) {
  switch (a) {
    case Activation::kSwiGLU: return "swiglu";
    case Activation::kGeLU: return "gelu";
    case Activation::kReLU: return "relu";
  }
  return "?";
}
inline const char* to_string(RouterKind r) { return r == RouterKind::kSoftmax ? "softmax" : "sigmoid"; }

inline Activation parse_activation(const std::string& s) {
  if (s == "swiglu") return Activation::kSwiGLU;
  if (s == "gelu") return Activation::kGeLU;
  if (s == "relu") return Activation::kReLU;
  throw ConfigError("activation", "\"" + s + "\"", "must be one of \"swiglu\", \"gelu\", \"relu\"");
}
inline RouterKind parse_router(const std::string& s) {
  if (s == "softmax") return RouterKind::kSoftmax;
  if (s == "sigmoid") return RouterKind::kSigmoid;
  throw ConfigError("router", "\"" + s + "\"", "must be one of \"softmax\", \"sigmoid\"");
}

// Runtime shapes and coefficients of one MoE layer. The compile-time policies of MoeLayer must agree
// with `router` and `activation` (checked when a layer is built).
struct MoeConfig {
  std::int64_t d_model = 0;
  std::int64_t d_expert = 0;         // hidden size of each FFN expert
  std::int64_t num_ffn_experts = 0;  // N_FFN
  std::int64_t num_zero_experts = 0;      // MoE++ zero-computation (ZC) experts: E(x) = 0
  std::int64_t num_copy_experts = 0;      //   E(x) = x
  std::int64_t num_constant_experts = 0;  //   E(x) = a1 x + a2 v, [a1, a2] = softmax(Wc x)
  std::int64_t top_k = 1;
  RouterKind router = RouterKind::kSoftmax;
  bool gating_residual = false;      // logits += W_g prev_logits (router::GatingResidual)
  bool renormalize = false;          // softmax router: renormalise the picked gates to sum to 1
  Activation activation = Activation::kSwiGLU;
  double capacity_factor = 0.0;      // gamma; 0 = dropless
  double lbl_coef = 0.0;
  double zloss_coef = 0.0;
  double tau = 1.0;                  // MoE++: eta_i of ZC experts in the LBL and the capacities
  // Parallel degrees (DESIGN §5): world = tp * ep * dp ranks, tp varying fastest. Checked against the
  // communicator and the parallel policy when a distributed layer is built.
  std::int64_t tp = 1, ep = 1, dp = 1;

  // N_E: all experts, in the order FFN, zero, copy, constant (logits, indices, counts).
  std::int64_t num_experts() const {
    return num_ffn_experts + num_zero_experts + num_copy_experts + num_constant_experts;
  }
  std::int64_t num_zc_experts() const { return num_zero_experts + num_copy_experts + num_constant_experts; }

  // Throws ConfigError naming the first field that breaks a rule.
  void validate() const {
    auto positive = [](const char* f, std::int64_t v) {
      if (v <= 0) throw ConfigError(f, std::to_string(v), "must be > 0");
    };
    positive("d_model", d_model);
    positive("d_expert", d_expert);
    positive("num_ffn_experts", num_ffn_experts);
    auto nonneg = [](const char* f, std::int64_t v) {
      if (v < 0) throw ConfigError(f, std::to_string(v), "must be >= 0");
    };
    nonneg("num_zero_experts", num_zero_experts);
    nonneg("num_copy_experts", num_copy_experts);
    nonneg("num_constant_experts", num_constant_experts);
    if (top_k < 1 || top_k > num_experts())
      throw ConfigError("top_k", std::to_string(top_k),
                        "must be in [1, number of experts = " + std::to_string(num_experts()) + "]");
    auto finite_nonneg = [](const char* f, double v) {
      if (!std::isfinite(v) || v < 0.0) throw ConfigError(f, detail::str(v), "must be finite and >= 0");
    };
    finite_nonneg("capacity_factor", capacity_factor);
    finite_nonneg("lbl_coef", lbl_coef);
    finite_nonneg("zloss_coef", zloss_coef);
    if (!std::isfinite(tau) || tau <= 0.0) throw ConfigError("tau", detail::str(tau), "must be finite and > 0");
    positive("tp", tp);
    positive("ep", ep);
    positive("dp", dp);
    // The sigmoid router always normalises its picked gates (DeepSeek-V3); `renormalize` is for softmax.
  }
};

}  // namespace moekit
