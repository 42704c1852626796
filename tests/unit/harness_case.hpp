#pragma once
// What the moekit-layer harness tests share (test_harness.cpp: outputs against a double reference;
// test_harness_errors.cpp: bad input): a case (config, parameter names and shapes, inputs), and a
// temporary folder with the case's files and the harness run on them in-process.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "../../examples/moekit_layer/harness.hpp"

namespace moekit_test::harness {

namespace fs = std::filesystem;
using Tensors = std::map<std::string, std::vector<double>>;  // values exactly representable in float
using Shapes = std::map<std::string, std::vector<std::int64_t>>;

struct Case {
  const char* name = "softmax top-2 swiglu";
  int T = 6, D = 8, F = 5, N = 4, K = 2;  // N: FFN experts
  int Z = 0, C = 0, Q = 0;                // MoE++ zero, copy and constant experts
  std::string router = "softmax", act = "swiglu";
  bool renorm = false, residual = false, bias = false;  // bias: router::BiasBalanced ("expert_bias")
  bool no_renorm = false;     // "renormalize": false written out (the sigmoid router's gates unnormalised)
  double scale = 1.0;         // routed_scaling_factor (written when not 1)
  bool router_bias = false;   // router::LinearBias: gate.bias
  int n_group = 0, topk_group = 1;  // router::GroupLimited when n_group > 0
  std::string group_score = "top2_sum";
  bool ffn_bias = false;                    // experts.{e}.w1/w3/w2.bias
  double swiglu_alpha = 0, swiglu_limit = 0;  // written when set (activation "swiglu_oai")
  int shared = 0, d_shared = 0;               // num_shared_experts, d_shared (0: not written, d_expert)
  int seq_len = 0;                            // > 0: "balance": "sequence" with this sequence_length
  bool shared_gate = false;
  bool expert_choice = false;  // "routing": "expert_choice": each expert takes its capacity of tokens
  std::vector<int> replay;     // router replay: the input replay.indices [T, K] (-1: no expert), or none
  int shared_width() const { return shared * (d_shared > 0 ? d_shared : F); }
  double capacity = 0.0, lbl = 0.01, z = 0.001, tau = 1.0, rate = 1e-3;
  std::uint64_t seed = 7;

  int NE() const { return N + Z + C + Q; }  // logits, indices and counts: FFN, zero, copy, constant
  bool gated() const { return act == "swiglu" || act == "swiglu_oai"; }
  nlohmann::json config() const {
    nlohmann::json j = base_config();
    if (no_renorm) j["renormalize"] = false;
    if (scale != 1.0) j["routed_scaling_factor"] = scale;
    if (router_bias) j["router_bias"] = true;
    if (n_group > 0) j["n_group"] = n_group, j["topk_group"] = topk_group, j["group_score"] = group_score;
    if (ffn_bias) j["ffn_bias"] = true;
    if (swiglu_alpha > 0) j["swiglu_alpha"] = swiglu_alpha;
    if (swiglu_limit > 0) j["swiglu_limit"] = swiglu_limit;
    if (shared > 0) j["num_shared_experts"] = shared;
    if (d_shared > 0) j["d_shared"] = d_shared;
    if (shared_gate) j["shared_gate"] = true;
    if (seq_len > 0) j["balance"] = "sequence", j["sequence_length"] = seq_len;
    if (expert_choice) j["routing"] = "expert_choice";
    return j;
  }
  nlohmann::json base_config() const {
    return {{"d_model", D},         {"d_expert", F},           {"num_ffn_experts", N},  {"num_zero_experts", Z},
            {"num_copy_experts", C}, {"num_constant_experts", Q}, {"top_k", K},        {"router", router},
            {"gating_residual", residual}, {"renormalize", renorm ? nlohmann::json(true) : nlohmann::json()}, {"activation", act}, {"capacity_factor", capacity},
            {"lbl_coef", lbl},      {"zloss_coef", z},         {"tau", tau},            {"backend", "host"},
            {"dtype", "fp32"},      {"expert_bias", bias},     {"bias_update_rate", rate}};
  }
  std::vector<std::string> params() const {
    std::vector<std::string> p{"gate.weight"};
    if (router_bias) p.push_back("gate.bias");
    for (int e = 0; e < N; ++e) {
      for (const char* w : {"w1", "w2", "w3"})
        if (w[1] != '3' || gated()) p.push_back("experts." + std::to_string(e) + "." + w + ".weight");
      if (ffn_bias)
        for (const char* w : {"w1", "w3", "w2"})
          if (w[1] != '3' || gated()) p.push_back("experts." + std::to_string(e) + "." + w + ".bias");
    }
    for (int j = 0; j < Q; ++j)
      for (const char* w : {"wc.weight", "v"}) p.push_back("constant." + std::to_string(j) + "." + w);
    if (shared > 0)
      for (const char* w : {"w1", "w2", "w3"}) p.push_back(std::string("shared_experts.") + w + ".weight");
    if (shared_gate) p.push_back("shared_expert_gate.weight");
    if (residual) p.push_back("gate_residual.weight");
    return p;
  }
  Shapes shapes() const {
    Shapes s{{"x", {T, D}}, {"dy", {T, D}}};
    if (residual) s["prev_logits"] = {T, NE()};
    if (bias) s["gate.e_score_correction_bias"] = {NE()};
    if (!replay.empty()) s["replay.indices"] = {T, K};
    for (const auto& p : params()) {
      if (p == "gate.weight") s[p] = {NE(), D};
      else if (p == "gate.bias") s[p] = {NE()};
      else if (p == "gate_residual.weight") s[p] = {NE(), NE()};
      else if (p == "shared_expert_gate.weight") s[p] = {1, D};
      else if (p == "shared_experts.w2.weight") s[p] = {D, shared_width()};
      else if (p.rfind("shared_experts.", 0) == 0) s[p] = {shared_width(), D};
      else if (p.find("wc.weight") != std::string::npos) s[p] = {2, D};
      else if (p.find(".v") != std::string::npos) s[p] = {D};
      else if (p.find("w2.bias") != std::string::npos) s[p] = {D};
      else if (p.find(".bias") != std::string::npos) s[p] = {F};
      else if (p.find("w2") != std::string::npos) s[p] = {D, F};
      else s[p] = {F, D};
    }
    return s;
  }
  // Uniform values rounded to float, so the harness and the reference see the same numbers.
  Tensors inputs() const {
    std::uint64_t st = seed * 0x9E3779B97F4A7C15ull + 1;
    auto uniform = [&](double bound) {
      st ^= st << 13, st ^= st >> 7, st ^= st << 17;
      return double(float(bound * (2.0 * double(st >> 11) * 0x1.0p-53 - 1.0)));
    };
    Tensors t;
    for (const auto& [name, shape] : shapes()) {
      if (name == "replay.indices") continue;  // given, below
      const bool data = name == "x" || name == "dy" || name == "prev_logits";
      // The biases at the scores' scale (about 1 / N_E), so they change some selections.
      const double bound = name == "gate.e_score_correction_bias" ? 0.3 : data ? 1.0 : 1.0 / std::sqrt(double(shape.back()));
      const auto numel = std::accumulate(shape.begin(), shape.end(), std::int64_t(1), std::multiplies<>());
      for (std::int64_t i = 0; i < numel; ++i) t[name].push_back(uniform(bound));
    }
    if (!replay.empty()) t["replay.indices"].assign(replay.begin(), replay.end());
    return t;
  }
};

// max |a - b| / max |b|: the error relative to the tensor's scale.
inline double rel_error(const std::vector<float>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double err = 0, scale = 1e-30;
  for (std::size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return err / scale;
}

struct Run {
  int rc = -1;
  std::string out, err;
};

// A temporary folder with cfg.json and in.safetensors for a case, and the harness run on them.
struct Harness {
  fs::path dir, cfg, in, out;
  explicit Harness(const Case& c = {}) {
    static std::atomic<int> n{0};
    dir = fs::temp_directory_path() / ("moekit_harness_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::remove_all(dir);
    fs::create_directories(dir);
    cfg = dir / "cfg.json", in = dir / "in.safetensors", out = dir / "out.safetensors";
    write_config(c.config());
    write_input(c.inputs(), c.shapes());
  }
  ~Harness() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  void write_config(const nlohmann::json& j) const { std::ofstream(cfg) << j.dump(2); }
  void write_input(const Tensors& t, const Shapes& s, const std::set<std::string>& as_bf16 = {}) const {
    moekit::io::SafetensorsWriter w;
    for (const auto& [name, v] : t) {
      const std::vector<float> f(v.begin(), v.end());
      if (name == "replay.indices") w.add_i32(name, s.at(name), std::vector<std::int32_t>(v.begin(), v.end()));
      else if (as_bf16.count(name)) w.add_f32_as_bf16(name, s.at(name), f);
      else w.add_f32(name, s.at(name), f);
    }
    w.write(in);
  }
  // Without `args`: --config cfg --input in --output out. "{CFG}", "{IN}", "{DIR}" in args are replaced.
  Run run(std::optional<std::vector<std::string>> given = std::nullopt) const {
    std::vector<std::string> args{"--config", cfg.string(), "--input", in.string(), "--output", out.string()};
    if (given) args = *given;
    for (auto& a : args)
      for (const auto& [key, path] : {std::pair{"{CFG}", cfg}, {"{IN}", in}, {"{DIR}", dir}})
        if (const auto at = a.find(key); at != std::string::npos) a.replace(at, std::string(key).size(), path.string());
    args.insert(args.begin(), "moekit-layer");
    std::vector<const char*> argv;
    for (const auto& a : args) argv.push_back(a.c_str());
    std::ostringstream o, e;
    Run r;
    r.rc = moekit_layer::run_harness(int(argv.size()), argv.data(), o, e);
    r.out = o.str(), r.err = e.str();
    return r;
  }
};

}  // namespace moekit_test::harness
