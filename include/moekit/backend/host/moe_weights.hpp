#pragma once
// Weights (or their gradients) of one MoE layer, torch Linear layout [out, in], experts contiguous.
// The initialisation and the named parameter list live here so every backend shares them: a CUDA layer
// initialised with a seed holds the same values as a host layer with that seed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/parameter.hpp"

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

// torch.nn.Linear's default initialisation, deterministic for a seed (sized weights, any backend).
template <class T>
void init_moe_weights(MoeWeights<T>& w, const MoeConfig& cfg, std::uint64_t seed) {
  SplitMix64 rng(seed);
  const double bd = 1.0 / std::sqrt(double(cfg.d_model)), bf = 1.0 / std::sqrt(double(cfg.d_expert));
  auto init = [&](std::vector<T>& v, double bound) { init_uniform(v.data(), std::int64_t(v.size()), bound, rng); };
  init(w.router, bd);
  init(w.w1, bd);
  init(w.w2, bf);
  init(w.w3, bd);
  init(w.const_wc, bd);
  init(w.const_v, bd);
  init(w.gate_residual, 1.0 / std::sqrt(double(cfg.num_experts())));
}

// Every parameter with its gradient, named as Mixtral (and MoE++) checkpoints name them.
template <class T>
std::vector<Parameter<T>> moe_parameters(const MoeConfig& cfg, MoeWeights<T>& value, MoeWeights<T>& grad,
                                         const std::string& prefix = "") {
  const auto d = cfg.d_model, f = cfg.d_expert, n = cfg.num_experts();
  const bool gated = !value.w3.empty(), residual = !value.gate_residual.empty();
  std::vector<Parameter<T>> ps;
  auto add = [&](std::string name, std::vector<T>& v, std::vector<T>& g, std::int64_t off, std::vector<std::int64_t> shape) {
    ps.push_back({prefix + std::move(name), v.data() + off, g.data() + off, std::move(shape)});
  };
  add("gate.weight", value.router, grad.router, 0, {n, d});
  for (std::int64_t e = 0; e < cfg.num_ffn_experts; ++e) {
    const std::string p = "experts." + std::to_string(e) + ".";
    add(p + "w1.weight", value.w1, grad.w1, e * f * d, {f, d});
    add(p + "w2.weight", value.w2, grad.w2, e * d * f, {d, f});
    if (gated) add(p + "w3.weight", value.w3, grad.w3, e * f * d, {f, d});
  }
  for (std::int64_t j = 0; j < cfg.num_constant_experts; ++j) {
    const std::string p = "constant." + std::to_string(j) + ".";
    add(p + "wc.weight", value.const_wc, grad.const_wc, j * 2 * d, {2, d});
    add(p + "v", value.const_v, grad.const_v, j * d, {d});
  }
  if (residual) add("gate_residual.weight", value.gate_residual, grad.gate_residual, 0, {n, n});
  return ps;
}

}  // namespace moekit
