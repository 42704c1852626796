#pragma once
// moekit-layer: runs one MoE layer forward and backward on tensors read from a safetensors file and
// writes every result, so another framework's MoE block can be checked against moekit's
// (docs/harness.md). run_harness() is the whole program; main.cpp only calls it, and the unit tests
// call it in-process. The layer is any MoeConfig the host backend runs: FFN experts plus MoE++'s zero,
// copy and constant experts, softmax or sigmoid routing, with or without the gating residual.
// "backend": "host" (fp32) runs here; "backend": "cuda" (fp32 or bf16) runs in cuda_layer_*.cu, which
// the build compiles with nvcc and announces with MOEKIT_LAYER_WITH_CUDA=1 (without it, as in the unit
// tests, a CUDA config is a ConfigError). Both runs hand back the same LayerOutputs (layer_io.hpp).
#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "layer_io.hpp"
#include "moekit/io/config_json.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/layer/any_layer.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/policy_switch.hpp"
#include "moekit/moe_layer.hpp"

namespace moekit_layer {

inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 2;  // every failure: arguments, config, input file, layer, device
#if defined(MOEKIT_LAYER_WITH_CUDA) && MOEKIT_LAYER_WITH_CUDA
inline constexpr bool kWithCuda = true;  // cuda_layer_fp32.cu and cuda_layer_bf16.cu are linked in
#else
inline constexpr bool kWithCuda = false;
#endif
inline constexpr const char* kUsage =
    "usage: moekit-layer --config cfg.json --input in.safetensors --output out.safetensors\n"
    "Runs one moekit MoE layer (the config's backend and dtype: host fp32, or cuda fp32/bf16) forward\n"
    "and backward and writes y, dx, the parameter gradients (and grad.prev_logits with the gating\n"
    "residual), the router results and the aux losses. Exit code 0 on success, 2 on error.\n";

// Bad command-line arguments: reported with the usage text.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string config, input, output;
  bool help = false;
};

// --name value or --name=value; each of --config, --input, --output exactly once.
inline Options parse_args(int argc, const char* const* argv) {
  Options o;
  std::map<std::string, std::string*> slots{{"--config", &o.config}, {"--input", &o.input}, {"--output", &o.output}};
  std::set<std::string> seen;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    if (arg == "-h" || arg == "--help") {
      o.help = true;
      return o;
    }
    const auto eq = arg.find('=');
    const bool inline_value = arg.rfind("--", 0) == 0 && eq != std::string::npos;
    if (inline_value) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    const auto slot = slots.find(arg);
    if (slot == slots.end()) throw UsageError("unknown argument '" + std::string(argv[i]) + "'");
    if (!seen.insert(arg).second) throw UsageError(arg + " given twice");
    if (!inline_value) {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      value = argv[++i];
    }
    if (value.empty()) throw UsageError(arg + " needs a non-empty value");
    *slot->second = value;
  }
  for (const auto& [name, slot] : slots)
    if (slot->empty()) throw UsageError("missing " + name);
  return o;
}

// The input tensor of router::BiasBalanced's biases (HF DeepSeek-V3's name).
inline constexpr const char* kExpertBiasInput = "gate.e_score_correction_bias";
inline constexpr const char* kReplayInput = "replay.indices";  // router replay (router/replay.hpp), optional

// What cfg.json asks for: the layer, and where and in which dtype it runs.
struct HarnessConfig {
  moekit::MoeConfig layer;
  Backend backend = Backend::kHost;
  Dtype dtype = Dtype::kFp32;
};

// cfg.json -> HarnessConfig. Shapes are required; the rest default as in MoeConfig ("backend": "host",
// "dtype": "fp32"). Any unknown key, wrong JSON type, unknown or unavailable backend/dtype is a
// ConfigError naming the key.
inline HarnessConfig parse_config(const nlohmann::json& j) {
  using moekit::ConfigError;
  // The layer's keys come from MoeConfig's field table (io/config_json.hpp) and the policies' options
  // (layer/policy_switch.hpp); the harness adds two.
  std::vector<std::string> known = moekit::config_keys(moekit::FieldScope::kLayer);
  const std::vector<std::string> option_keys = moekit::policy_option_keys();
  known.insert(known.end(), option_keys.begin(), option_keys.end());
  known.insert(known.end(), {"backend", "dtype"});
  if (!j.is_object()) throw ConfigError("config", j.dump(), "must be a JSON object");
  for (const auto& [key, value] : j.items()) {
    if (std::find(known.begin(), known.end(), key) != known.end()) continue;
    std::string list;
    for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
    throw ConfigError(key, value.dump(), "is not a moekit-layer config key (known keys: " + list + ")");
  }
  auto string = [&](const char* key, const char* fallback) {
    if (!j.contains(key)) return std::string(fallback);
    if (!j[key].is_string()) throw ConfigError(key, j[key].dump(), "must be a JSON string");
    return j[key].get<std::string>();
  };
  moekit::MoeConfig c;
  moekit::read_config_fields(j, c, moekit::FieldScope::kLayer);
  moekit::read_policy_options(j, c, option_keys);
  HarnessConfig h;
  const auto backend = string("backend", "host"), dtype = string("dtype", "fp32");
  if (backend == "cuda") h.backend = Backend::kCuda;
  else if (backend != "host") throw ConfigError("backend", "\"" + backend + "\"", "must be one of \"host\", \"cuda\"");
  if (dtype == "bf16") h.dtype = Dtype::kBf16;
  else if (dtype != "fp32") throw ConfigError("dtype", "\"" + dtype + "\"", "must be one of \"fp32\", \"bf16\"");
  if (h.backend == Backend::kCuda && !kWithCuda)
    throw ConfigError("backend", "\"cuda\"",
                      "this moekit-layer was built without CUDA (configure with -DMOEKIT_ENABLE_CUDA=ON, e.g. "
                      "cmake --preset cuda, for a CUDA build; or use \"host\")");

  c.validate();
  // The switch's row for the config and its policies' checks (their options' types and rules).
  moekit::with_policies(c, [&]<class R, class E>(std::type_identity<R>, std::type_identity<E>) { moekit::check_policies<R, E>(c); });
  h.layer = c;
  return h;
}

// The effective configuration, every key spelled out (stored in the output's metadata).
inline nlohmann::json config_json(const HarnessConfig& h) {
  nlohmann::json j = nlohmann::json::object();
  moekit::write_config_fields(h.layer, j, moekit::FieldScope::kLayer);
  moekit::write_policy_options(h.layer, j);
  j["backend"] = to_string(h.backend);
  j["dtype"] = to_string(h.dtype);
  return j;
}

inline HarnessConfig read_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open the config file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": not valid JSON: " + e.what());
  }
  try {
    return parse_config(j);
  } catch (const moekit::ConfigError& e) {
    throw std::runtime_error(path + ": " + e.what());  // name the file too
  }
}

using Shape = std::vector<std::int64_t>;

// The parameters of a layer with this config, in Mixtral's (and MoE++'s, GPT-OSS's) names and torch
// Linear layout [out, in]: the parameter table of the layer type the runtime switch picks, so the same
// list as MoeLayer::parameters().
inline std::vector<std::pair<std::string, Shape>> parameter_shapes(const moekit::MoeConfig& c) {
  const moekit::ParameterTable t = moekit::with_policies(c, [&]<class R, class E>(std::type_identity<R>, std::type_identity<E>) {
    return moekit::ParameterTable::of<R, E>(c);
  });
  std::vector<std::pair<std::string, Shape>> p;
  for (const auto& s : t.specs()) p.push_back({s.name, s.shape});
  return p;
}

// The input tensors of this config in words, for the message about a tensor that does not belong.
inline std::string describe_inputs(const moekit::MoeConfig& c) {
  auto range = [](const char* what, std::int64_t count) {
    return count == 1 ? std::string(what) + "{0}" : std::string(what) + "{0.." + std::to_string(count - 1) + "}";
  };
  std::string s = std::string("x, dy") + (c.gating_residual ? ", prev_logits" : "") + ", gate.weight, " +
                  range("experts.", c.num_ffn_experts) + ".w1/w2" +
                  (moekit::is_gated(c.activation) ? "/w3" : "") + ".weight";
  if (c.num_constant_experts > 0) s += ", " + range("constant.", c.num_constant_experts) + ".wc.weight/v";
  if (c.gating_residual) s += ", gate_residual.weight";
  if (moekit::option_flag(c, "router_bias")) s += ", gate.bias";
  if (moekit::option_flag(c, "ffn_bias"))
    s += ", " + range("experts.", c.num_ffn_experts) + ".w1/w2" + (moekit::is_gated(c.activation) ? "/w3" : "") + ".bias";
  if (c.expert_bias) s += std::string(", ") + kExpertBiasInput;
  s += std::string(", optionally ") + kReplayInput;
  return s + " for activation \"" + moekit::to_string(c.activation) + "\", " + std::to_string(c.num_constant_experts) +
         " constant experts, gating_residual " + (c.gating_residual ? "true" : "false");
}

// Reads every input and checks it against the config (dtype, shape, nothing missing or extra).
inline LayerInputs read_inputs(const moekit::MoeConfig& cfg, const moekit::io::SafetensorsFile& in) {
  const std::int64_t d = cfg.d_model;
  const auto& xi = in.info("x");
  if (xi.shape.size() != 2 || xi.shape[1] != d)
    throw moekit::FormatError(in.source() + ": tensor 'x': wrong shape: expected [T, d_model = " + std::to_string(d) +
                              "], found " + moekit::io::detail::shape_str(xi.shape));
  LayerInputs r;
  const std::int64_t tokens = r.tokens = xi.shape[0];
  if (tokens == 0) throw moekit::FormatError(in.source() + ": tensor 'x' has no tokens (shape [0, " + std::to_string(d) + "])");
  r.x = in.get_f32("x", {tokens, d});
  r.dy = in.get_f32("dy", {tokens, d});
  // The previous MoE layer's router logits, which the gating residual adds W_g times to this layer's.
  if (cfg.gating_residual) r.prev_logits = in.get_f32("prev_logits", {tokens, cfg.num_experts()});
  // router::BiasBalanced's selection biases, under HF DeepSeek-V3's name (state, not a parameter).
  if (cfg.expert_bias) r.expert_bias = in.get_f32(kExpertBiasInput, {cfg.num_experts()});
  // Router replay's record: the experts of each slot (-1: none) instead of the router's selection.
  if (in.contains(kReplayInput)) r.replay = in.get_i32(kReplayInput, {tokens, cfg.top_k});
  for (const auto& [name, shape] : parameter_shapes(cfg)) r.weights[name] = in.get_f32(name, shape);
  for (const auto& name : in.names())
    if (name != "x" && name != "dy" && !(cfg.gating_residual && name == "prev_logits") &&
        !(cfg.expert_bias && name == kExpertBiasInput) && name != kReplayInput && !r.weights.count(name))
      throw moekit::FormatError(in.source() + ": tensor '" + name + "' is not an input of this layer (inputs: " +
                                describe_inputs(cfg) + ")");
  return r;
}

// MoeLayer<backend::Host<V>> forward + backward, the layer chosen by the one runtime switch. V = bf16:
// x, dy and every weight are rounded to bf16 on the way in (as the layer stores them), y and dx come
// back widened; prev_logits, the router results and every gradient are fp32 in the layer.
template <class V = float>
LayerOutputs run_host_layer(const moekit::MoeConfig& cfg, const LayerInputs& in) {
  using moekit::backend::host::convert;
  const std::int64_t tokens = in.tokens, d = cfg.d_model, n = cfg.num_experts(), k = cfg.top_k;
  LayerOutputs out;
  const auto layer = moekit::make_moe_layer<moekit::backend::Host<V>>(cfg);
  auto params = layer->parameters();
  for (auto& p : params) {
    const auto it = in.weights.find(p.name);
    if (it == in.weights.end() || std::int64_t(it->second.size()) != p.numel())
      throw std::logic_error("moekit-layer: the layer's parameter '" + p.name + "' does not match parameter_shapes()");
    convert(it->second.data(), p.value, p.numel());
  }
  std::vector<V> x(in.x.size()), dy(in.dy.size()), y(in.x.size()), dx(in.x.size());
  convert(in.x.data(), x.data(), std::int64_t(x.size()));
  convert(in.dy.data(), dy.data(), std::int64_t(dy.size()));
  layer->zero_grad();
  if (layer->biased()) layer->set_expert_bias(in.expert_bias);
  if (!in.replay.empty()) layer->set_replay(moekit::MatrixView<const std::int32_t>(in.replay.data(), {tokens, k}));
  out.y.resize(in.x.size()), out.dx.resize(in.x.size()), out.grad_prev_logits.resize(in.prev_logits.size());
  // Views of nothing (data == nullptr) without the gating residual.
  const moekit::MatrixView<const float> prev{in.prev_logits.empty() ? nullptr : in.prev_logits.data(), {tokens, n}};
  const moekit::MatrixView<float> dprev{out.grad_prev_logits.empty() ? nullptr : out.grad_prev_logits.data(), {tokens, n}};
  const moekit::AuxLosses aux =
      layer->forward(moekit::MatrixView<const V>(x.data(), {tokens, d}), moekit::MatrixView<V>(y.data(), {tokens, d}), prev);
  convert(y.data(), out.y.data(), std::int64_t(y.size()));
  // Router results are views into the layer: copy them before backward reuses any buffer.
  const moekit::ForwardViews<float> v = layer->views();
  out.logits.assign(v.logits, v.logits + tokens * n);
  if (v.routing == moekit::Routing::kTokenChoice) {
    out.topk_indices.assign(v.topk_indices, v.topk_indices + tokens * k);
    if (in.replay.empty()) out.topk_gates.assign(v.topk_gates, v.topk_gates + tokens * k);
    else out.topk_gates = replayed_gates(in.replay, k, v.plan.layout, v.plan.gate);
  }
  dense_choice(v.routing, v.plan.layout, v.plan.expert, v.plan.gate, n, out);
  const auto counts = layer->expert_counts();
  out.expert_counts.assign(counts.data, counts.data + n);
  out.lbl = aux.lbl, out.zloss = aux.zloss;
  if (layer->biased()) out.expert_bias_update = layer->expert_bias_update();
  // L = sum(y * dy) + lbl_coef * LBL + zloss_coef * zloss.
  // This is the last MoE layer (no next layer's residual sends gradient back to its logits).
  layer->backward(moekit::MatrixView<const V>(dy.data(), {tokens, d}), moekit::MatrixView<V>(dx.data(), {tokens, d}), 1.0, {}, dprev);
  convert(dx.data(), out.dx.data(), std::int64_t(dx.size()));
  for (const auto& p : params) out.grads[p.name].assign(p.grad, p.grad + p.numel());
  return out;
}

// The outputs under their names (docs/harness.md), the same for every backend and dtype.
// Whether the config asks for expert-choice routing (router/expert_choice.hpp).
inline bool expert_choice(const moekit::MoeConfig& c) {
  const auto* v = c.options.find("routing");
  return v && std::holds_alternative<std::string>(*v) && std::get<std::string>(*v) == "expert_choice";
}

inline moekit::io::SafetensorsWriter write_outputs(const HarnessConfig& h, std::int64_t tokens, const LayerOutputs& o) {
  const moekit::MoeConfig& cfg = h.layer;
  const std::int64_t d = cfg.d_model, n = cfg.num_experts(), k = cfg.top_k;
  auto sized = [](const auto& v, std::int64_t numel, const std::string& name) -> const auto& {
    if (std::int64_t(v.size()) != numel)
      throw std::logic_error("moekit-layer: the layer returned " + std::to_string(v.size()) + " values for '" + name +
                             "', expected " + std::to_string(numel));
    return v;
  };
  moekit::io::SafetensorsWriter out;
  out.add_f32("y", {tokens, d}, sized(o.y, tokens * d, "y"));
  out.add_f32("dx", {tokens, d}, sized(o.dx, tokens * d, "dx"));
  out.add_f32("logits", {tokens, n}, sized(o.logits, tokens * n, "logits"));
  if (expert_choice(cfg)) {  // expert choice: the pairs taken, dense
    out.add_i32("choice.taken", {tokens, n}, sized(o.choice_taken, tokens * n, "choice.taken"));
    out.add_f32("choice.gates", {tokens, n}, sized(o.choice_gates, tokens * n, "choice.gates"));
  } else {
    out.add_i32("topk.indices", {tokens, k}, sized(o.topk_indices, tokens * k, "topk.indices"));
    out.add_f32("topk.gates", {tokens, k}, sized(o.topk_gates, tokens * k, "topk.gates"));
  }
  out.add_i32("expert.counts", {n}, sized(o.expert_counts, n, "expert.counts"));
  out.add_f32("aux.lbl", {1}, std::vector<float>{float(o.lbl)});
  out.add_f32("aux.zloss", {1}, std::vector<float>{float(o.zloss)});
  if (cfg.gating_residual)
    out.add_f32("grad.prev_logits", {tokens, n}, sized(o.grad_prev_logits, tokens * n, "grad.prev_logits"));
  if (cfg.expert_bias) out.add_f32("expert_bias.update", {n}, sized(o.expert_bias_update, n, "expert_bias.update"));
  for (const auto& [name, shape] : parameter_shapes(cfg)) {
    const auto it = o.grads.find(name);
    if (it == o.grads.end()) throw std::logic_error("moekit-layer: the layer returned no gradient for '" + name + "'");
    std::int64_t numel = 1;
    for (auto s : shape) numel *= s;
    out.add_f32("grad." + name, shape, sized(it->second, numel, "grad." + name));
  }
  out.set_metadata("format", "moekit-layer");
  out.set_metadata("config", config_json(h).dump());
  return out;
}

// Reads and checks every input, runs forward + backward on the config's backend and dtype, returns the
// outputs (not yet written). Every tensor is checked against the config before the layer allocates anything.
inline moekit::io::SafetensorsWriter run_layer(const HarnessConfig& h, const moekit::io::SafetensorsFile& in,
                                               LayerOutputs* outputs = nullptr) {
  const LayerInputs inputs = read_inputs(h.layer, in);
  LayerOutputs o;
  if (h.backend == Backend::kHost) {
    o = h.dtype == Dtype::kBf16 ? run_host_layer<moekit::bf16>(h.layer, inputs) : run_host_layer<float>(h.layer, inputs);
  } else {
#if defined(MOEKIT_LAYER_WITH_CUDA) && MOEKIT_LAYER_WITH_CUDA
    o = h.dtype == Dtype::kBf16 ? run_cuda_layer_bf16(h.layer, inputs) : run_cuda_layer_fp32(h.layer, inputs);
#else
    throw std::logic_error("moekit-layer: backend \"cuda\" in a build without CUDA (parse_config lets it through)");
#endif
  }
  moekit::io::SafetensorsWriter w = write_outputs(h, inputs.tokens, o);
  if (outputs) *outputs = std::move(o);
  return w;
}

// The program: 0 on success (output written atomically), 2 with a message on `err` on any error.
inline int run_harness(int argc, const char* const* argv, std::ostream& out = std::cout, std::ostream& err = std::cerr) {
  try {
    const Options opt = parse_args(argc, argv);
    if (opt.help) {
      out << kUsage;
      return kExitOk;
    }
    const HarnessConfig h = read_config(opt.config);
    const moekit::MoeConfig& cfg = h.layer;
    const moekit::io::SafetensorsFile in = moekit::io::read_safetensors(opt.input);
    LayerOutputs o;
    const moekit::io::SafetensorsWriter result = run_layer(h, in, &o);
    result.write(opt.output);
    out << "moekit-layer: " << to_string(h.backend) << " " << to_string(h.dtype) << ", " << in.info("x").shape[0]
        << " tokens, " << cfg.num_experts() << " experts (" << cfg.num_zc_experts() << " zero-computation), top-"
        << cfg.top_k << "; lbl " << o.lbl << ", zloss " << o.zloss << "; wrote " << opt.output << "\n";
    if (h.backend == Backend::kHost) out << "moekit-layer: " << moekit::backend::host::gemm_library().line() << "\n";
    if (h.backend == Backend::kHost && h.dtype == Dtype::kBf16) out << "moekit-layer: " << moekit::backend::host::bf16_gemm().line() << "\n";
    return kExitOk;
  } catch (const UsageError& e) {
    err << "moekit-layer: error: " << e.what() << "\n" << kUsage;
  } catch (const std::exception& e) {
    err << "moekit-layer: error: " << e.what() << "\n";
  } catch (...) {
    err << "moekit-layer: error: unknown exception\n";
  }
  return kExitError;
}

}  // namespace moekit_layer
