#pragma once
// The plain data that crosses between the harness (harness.hpp: JSON, safetensors, compiled by the C++
// compiler) and the layer runs: the host run in harness.hpp and the CUDA runs in cuda_layer_fp32.cu and
// cuda_layer_bf16.cu (compiled by nvcc, with neither nlohmann_json nor safetensors). Every tensor is
// fp32 (int32 for indices and counts) here, whatever dtype the layer computes in.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/router/expert_choice.hpp"

namespace moekit_layer {

// "backend" and "dtype" of cfg.json.
enum class Backend { kHost, kCuda };
enum class Dtype { kFp32, kBf16 };
inline const char* to_string(Backend b) { return b == Backend::kCuda ? "cuda" : "host"; }
inline const char* to_string(Dtype d) { return d == Dtype::kBf16 ? "bf16" : "fp32"; }

// The inputs of one run, already checked against the config (shapes, names).
struct LayerInputs {
  std::int64_t tokens = 0;
  std::vector<float> x, dy;                           // [T, D]
  std::vector<float> prev_logits;                     // [T, N_E] with the gating residual, else empty
  std::vector<float> expert_bias;                     // [N_E] with "expert_bias": gate.e_score_correction_bias
  std::vector<std::int32_t> replay;                   // [T, k] router replay's record (-1: no expert), or empty
  std::map<std::string, std::vector<float>> weights;  // every parameter, by its name (parameter_shapes())
};

// The results of one forward + backward; the harness names and writes them (docs/harness.md).
struct LayerOutputs {
  std::vector<float> y, dx;                         // [T, D]
  std::vector<float> logits;                        // [T, N_E]
  std::vector<std::int32_t> topk_indices;           // [T, k]; token choice
  std::vector<float> topk_gates;                    // [T, k]; token choice
  std::vector<std::int32_t> choice_taken;           // [T, N_E] 1 where expert e took token t; expert choice
  std::vector<float> choice_gates;                  // [T, N_E] the gate of each pair taken, else 0; expert choice
  std::vector<std::int32_t> expert_counts;          // [N_E], after capacity drops
  double lbl = 0.0, zloss = 0.0;                    // unscaled aux losses
  std::vector<float> grad_prev_logits;              // [T, N_E] with the gating residual, else empty
  std::vector<float> expert_bias_update;            // [N_E] with "expert_bias": the update this forward's counts apply
  std::map<std::string, std::vector<float>> grads;  // fp32 gradient of every parameter, by its name
};

// Expert choice's plan (by token; host copies of its arrays) as the dense [T, N_E] outputs.
inline void dense_choice(moekit::Routing routing, const moekit::SlotLayout& slots, const int* experts, const float* gates,
                         std::int64_t n, LayerOutputs& out) {
  if (routing != moekit::Routing::kExpertChoice) return;
  out.choice_taken.assign(std::size_t(slots.tokens * n), 0);
  out.choice_gates.assign(std::size_t(slots.tokens * n), 0.f);
  for (int s = 0; s < slots.slots; ++s) {
    const std::size_t at = std::size_t(slots.token(s)) * std::size_t(n) + std::size_t(experts[s]);
    out.choice_taken[at] = 1, out.choice_gates[at] = gates[s];
  }
}

// A replayed forward's gates as [T, k] (0 where the record has -1), from its plan by token (host copies).
inline std::vector<float> replayed_gates(const std::vector<std::int32_t>& record, std::int64_t k, const moekit::SlotLayout& slots,
                                         const float* gates) {
  std::vector<float> out(record.size(), 0.f);
  for (int t = 0; t < slots.tokens; ++t) {
    int s = slots.begin(t);
    for (std::int64_t j = 0; j < k; ++j)
      if (record[std::size_t(t * k + j)] >= 0) out[std::size_t(t * k + j)] = gates[s++];
  }
  return out;
}

// The CUDA runs: MoeLayer<backend::Cuda<float>> and MoeLayer<backend::Cuda<bf16>>. Defined in
// cuda_layer_fp32.cu and cuda_layer_bf16.cu, which are compiled (and MOEKIT_LAYER_WITH_CUDA defined)
// only when moekit is configured with CUDA; harness.hpp calls them only then. A std::runtime_error
// when no CUDA device can be used.
LayerOutputs run_cuda_layer_fp32(const moekit::MoeConfig& cfg, const LayerInputs& in);
LayerOutputs run_cuda_layer_bf16(const moekit::MoeConfig& cfg, const LayerInputs& in);

}  // namespace moekit_layer
