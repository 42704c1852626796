#pragma once
// Shared experts (DeepSeekMoE, arXiv 2401.06066; DeepSeek-V2/V3; Qwen2-MoE): an FFN every token passes
// through, added to the routed output, y_t += σ_t · FFN_s(x_t) (docs/design.md §3). FFN_s is a SwiGLU
// FFN of width n · d_shared: DeepSeek's n shared experts of d_expert are one FFN, as transformers builds
// them (tensors shared_experts.w1.weight, .w3.weight [n·d_shared, D], .w2.weight [D, n·d_shared]).
// σ_t = 1, or with shared_gate σ_t = sigmoid(w_sg · x_t), w_sg [1, D] trainable
// (shared_expert_gate.weight, Qwen2-MoE). The routed scaling factor never applies to it.
//
// Every expert set may have them (an option, not a type: no new rows in the runtime switch). Under
// tensor parallelism FFN_s splits like a dense FFN (W1/W3 by rows, W2 by columns: ParamShard::kTensor*)
// and its partial output is summed over the tp group; under expert and data parallelism it is
// replicated, its gradients reduced over the ranks that hold different tokens.
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/options.hpp"
#include "moekit/core/parameter.hpp"

namespace moekit::experts {

struct SharedOptions {
  std::int64_t num_shared_experts = 0;  // n
  std::int64_t d_shared = 0;            // each one's width; 0: d_expert
  bool shared_gate = false;             // σ_t = sigmoid(w_sg · x_t) (Qwen2-MoE), else 1 (DeepSeek)

  static constexpr auto fields() {
    using R = FieldRule;
    return std::make_tuple(
        ConfigField<std::int64_t, SharedOptions>{"num_shared_experts", &SharedOptions::num_shared_experts, R::kNonNegative},
        ConfigField<std::int64_t, SharedOptions>{"d_shared", &SharedOptions::d_shared, R::kNonNegative},
        ConfigField<bool, SharedOptions>{"shared_gate", &SharedOptions::shared_gate});
  }
  // FFN_s's width n · d_shared (0: no shared experts).
  std::int64_t width(const MoeConfig& c) const { return num_shared_experts * (d_shared > 0 ? d_shared : c.d_expert); }
  void validate(const MoeConfig& c) const {
    if (num_shared_experts == 0) {
      if (d_shared > 0) throw ConfigError("d_shared", std::to_string(d_shared), "needs num_shared_experts > 0");
      if (shared_gate) throw ConfigError("shared_gate", "true", "needs num_shared_experts > 0");
      return;
    }
    const std::int64_t w = width(c);
    if (w > (std::int64_t(1) << 30))
      throw ConfigError("num_shared_experts", std::to_string(num_shared_experts), "times d_shared must be <= 2^30");
    if (w % c.tp != 0)
      throw ConfigError("d_shared", std::to_string(d_shared > 0 ? d_shared : c.d_expert),
                        "times num_shared_experts (" + std::to_string(w) + ") must be divisible by tp = " + std::to_string(c.tp));
  }
};

// The policy: its options and its tensors. Every layer lists it after its expert set's parts
// (experts/policy.hpp for_each_expert_part), so the keys are every layer's; the backends compute it
// (backend/host/layer_ops.hpp, backend/cuda/shared_expert.cuh) when the table holds its families.
struct SharedExperts {
  using options = SharedOptions;
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    const SharedOptions o = read_options<SharedOptions>(c);
    const std::int64_t w = o.width(c), m = c.d_model;
    if (w == 0) return;
    const double bd = 1.0 / std::sqrt(double(m)), bf = 1.0 / std::sqrt(double(w));
    // One FFN: one tensor per family. w1 and w3 share a region ([w1; w3]: one GEMM), as the experts'.
    d.add({"shared_w1", "shared_experts.w1.weight", 1, {w, m}, ParamShard::kTensorRows, "shared_w13", "shared", bd, false});
    d.add({"shared_w2", "shared_experts.w2.weight", 1, {m, w}, ParamShard::kTensorCols, "shared_w2", "shared", bf, false});
    d.add({"shared_w3", "shared_experts.w3.weight", 1, {w, m}, ParamShard::kTensorRows, "shared_w13", "shared", bd, false});
    if (o.shared_gate)
      d.add({"shared_gate", "shared_expert_gate.weight", 1, {1, m}, ParamShard::kReplicated, "", "", bd, false});
  }
};

}  // namespace moekit::experts
