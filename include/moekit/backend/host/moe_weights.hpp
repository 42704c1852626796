#pragma once
// Weights (or their gradients) of one MoE layer, torch Linear layout [out, in], experts contiguous.
#include <algorithm>
#include <vector>

#include "moekit/core/config.hpp"

namespace moekit {

template <class T>
struct MoeWeights {
  std::vector<T> router;         // [N_E, D]              gate.weight
  std::vector<T> w1;             // [N_FFN, d_expert, D]  experts.{i}.w1.weight
  std::vector<T> w2;             // [N_FFN, D, d_expert]  experts.{i}.w2.weight
  std::vector<T> w3;             // [N_FFN, d_expert, D]  experts.{i}.w3.weight (gated activations only)
  std::vector<T> const_wc;       // [N_const, 2, D]       constant.{j}.wc.weight
  std::vector<T> const_v;        // [N_const, D]          constant.{j}.v
  std::vector<T> gate_residual;  // [N_E, N_E]            gate_residual.weight (router::GatingResidual only)

  void resize(const MoeConfig& c, bool gated, bool residual) {
    const auto e = c.num_ffn_experts, d = c.d_model, f = c.d_expert, n = c.num_experts();
    router.assign(n * d, T(0));
    w1.assign(e * f * d, T(0));
    w2.assign(e * d * f, T(0));
    w3.assign(gated ? e * f * d : 0, T(0));
    const_wc.assign(c.num_constant_experts * 2 * d, T(0));
    const_v.assign(c.num_constant_experts * d, T(0));
    gate_residual.assign(residual ? n * n : 0, T(0));
  }
  void zero() {
    for (auto* v : {&router, &w1, &w2, &w3, &const_wc, &const_v, &gate_residual}) std::fill(v->begin(), v->end(), T(0));
  }
};

}  // namespace moekit
