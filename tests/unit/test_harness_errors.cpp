// The moekit-layer harness on bad input: every class of error exits 2 with a message naming what is
// wrong and writes nothing; backend and dtype choices; --help.
#include <doctest/doctest.h>

#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "harness_case.hpp"

using namespace moekit_test::harness;

namespace {

struct ErrorCase {
  const char* what;
  std::function<void(Harness&)> setup;
  std::vector<std::string> message;
  std::optional<std::vector<std::string>> args = std::nullopt;
};
// Setups that write the case's config or inputs after an edit.
std::function<void(Harness&)> with_config(const Case& c, std::function<void(nlohmann::json&)> edit) {
  return [c, edit](Harness& h) {
    nlohmann::json j = c.config();
    edit(j);
    h.write_config(j);
  };
}
std::function<void(Harness&)> with_tensors(const Case& c, std::function<void(Tensors&, Shapes&)> edit,
                                           std::set<std::string> bf16 = {}) {
  return [c, edit, bf16](Harness& h) {
    Tensors t = c.inputs();
    Shapes s = c.shapes();
    edit(t, s);
    h.write_input(t, s, bf16);
  };
}
void check_errors(const Case& c, const std::vector<ErrorCase>& errors) {
  for (const auto& e : errors) {
    CAPTURE(e.what);
    Harness h(c);
    e.setup(h);
    const Run r = h.run(e.args);
    CHECK(r.rc == 2);
    CHECK(r.err.rfind("moekit-layer: error: ", 0) == 0);
    for (const auto& m : e.message) CHECK_MESSAGE(r.err.find(m) != std::string::npos, "expected '" << m << "' in: " << r.err);
    CHECK_FALSE(fs::exists(h.out));
  }
}

}  // namespace

TEST_CASE("moekit-layer: every error exits 2 with a message and writes nothing") {
  const Case c;
  auto with_config = [&](std::function<void(nlohmann::json&)> edit) { return ::with_config(c, std::move(edit)); };
  auto with_tensors = [&](std::function<void(Tensors&, Shapes&)> edit, std::set<std::string> bf16 = {}) {
    return ::with_tensors(c, std::move(edit), std::move(bf16));
  };
  check_errors(c, {
      {"missing tensor", with_tensors([](Tensors& t, Shapes&) { t.erase("experts.1.w2.weight"); }),
       {"in.safetensors", "no tensor named 'experts.1.w2.weight'"}},
      {"wrong shape", with_tensors([&](Tensors& t, Shapes& s) {
         s["gate.weight"] = {c.N, c.D + 1};
         t["gate.weight"].resize(std::size_t(c.N * (c.D + 1)), 0.5);
       }),
       {"tensor 'gate.weight'", "expected [4, 8], found [4, 9]"}},
      {"dy rows differ from x", with_tensors([&](Tensors& t, Shapes& s) {
         s["dy"] = {c.T + 1, c.D};
         t["dy"].resize(std::size_t((c.T + 1) * c.D), 0.5);
       }),
       {"tensor 'dy'", "expected [6, 8], found [7, 8]"}},
      {"x not a matrix", with_tensors([&](Tensors&, Shapes& s) { s["x"] = {c.T * c.D}; }), {"tensor 'x'", "[48]"}},
      {"wrong dtype", with_tensors([](Tensors&, Shapes&) {}, {"x"}), {"tensor 'x'", "expected F32, found BF16"}},
      {"unexpected tensor", with_tensors([&](Tensors& t, Shapes& s) {
         t["experts.4.w1.weight"] = t["experts.0.w1.weight"];
         s["experts.4.w1.weight"] = s["experts.0.w1.weight"];
       }),
       {"'experts.4.w1.weight' is not an input"}},
      {"non-finite x", with_tensors([](Tensors& t, Shapes&) { t["x"][3] = std::nan(""); }), {"not finite"}},
      {"truncated data", [](Harness& h) { fs::resize_file(h.in, fs::file_size(h.in) - 7); }, {"in.safetensors", "truncated"}},
      {"truncated header", [](Harness& h) { fs::resize_file(h.in, 20); }, {"in.safetensors", "runs past the end of the file"}},
      {"not safetensors", [](Harness& h) { std::ofstream(h.in) << "hello"; }, {"shorter than the 8-byte header"}},
      {"input missing", [](Harness& h) { fs::remove(h.in); }, {"in.safetensors: no such file"}},
      {"unknown activation", with_config([](nlohmann::json& j) { j["activation"] = "tanh"; }),
       {"cfg.json", "activation = \"tanh\"", "\"swiglu\""}},
      {"unknown router", with_config([](nlohmann::json& j) { j["router"] = "hash"; }), {"router = \"hash\""}},
      {"top_k > experts", with_config([](nlohmann::json& j) { j["top_k"] = 5; }), {"top_k = 5", "number of experts = 4"}},
      {"unknown key", with_config([](nlohmann::json& j) { j["d_hidden"] = 3; }), {"d_hidden", "not a moekit-layer config key"}},
      {"missing key", with_config([](nlohmann::json& j) { j.erase("d_expert"); }), {"d_expert", "is required"}},
      {"string for integer", with_config([](nlohmann::json& j) { j["d_model"] = "8"; }), {"d_model", "must be a JSON integer"}},
      {"float for integer", with_config([](nlohmann::json& j) { j["top_k"] = 2.5; }), {"top_k", "must be a JSON integer"}},
      {"number for bool", with_config([](nlohmann::json& j) { j["renormalize"] = 1; }), {"renormalize", "true or false"}},
      {"negative coefficient", with_config([](nlohmann::json& j) { j["lbl_coef"] = -1; }), {"lbl_coef"}},
      {"unknown backend", with_config([](nlohmann::json& j) { j["backend"] = "rocm"; }),
       {"cfg.json", "backend = \"rocm\"", "must be one of \"host\", \"cuda\""}},
      {"backend not a string", with_config([](nlohmann::json& j) { j["backend"] = 1; }), {"backend", "must be a JSON string"}},
      {"unknown dtype", with_config([](nlohmann::json& j) { j["dtype"] = "fp16"; }),
       {"cfg.json", "dtype = \"fp16\"", "must be one of \"fp32\", \"bf16\""}},
      {"dtype names are lower case", with_config([](nlohmann::json& j) { j["dtype"] = "BF16"; }), {"dtype = \"BF16\""}},
      {"config not an object", [](Harness& h) { std::ofstream(h.cfg) << "[1, 2]"; }, {"must be a JSON object"}},
      {"config not JSON", [](Harness& h) { std::ofstream(h.cfg) << "{\"d_model\": "; }, {"cfg.json", "not valid JSON"}},
      {"config missing", [](Harness& h) { fs::remove(h.cfg); }, {"cfg.json", "cannot open"}},
      {"no arguments", [](Harness&) {}, {"missing --config", "usage:"}, std::vector<std::string>{}},
      {"missing --output", [](Harness&) {}, {"missing --output"}, std::vector<std::string>{"--config", "{CFG}", "--input", "{IN}"}},
      {"unknown argument", [](Harness&) {}, {"unknown argument '--foo'"}, std::vector<std::string>{"--foo", "1"}},
      {"missing value", [](Harness&) {}, {"--config needs a value"}, std::vector<std::string>{"--config"}},
      {"repeated argument", [](Harness&) {}, {"--input given twice"},
       std::vector<std::string>{"--config={CFG}", "--input={IN}", "--input={IN}", "--output={DIR}/out.safetensors"}},
      {"output folder missing", [](Harness&) {}, {"cannot create a temporary file"},
       std::vector<std::string>{"--config={CFG}", "--input={IN}", "--output={DIR}/no/out.safetensors"}},
      {"prev_logits without gating residual", with_tensors([&](Tensors& t, Shapes& s) {
         t["prev_logits"].assign(std::size_t(c.T * c.N), 0.5);
         s["prev_logits"] = {c.T, c.N};
       }),
       {"'prev_logits' is not an input", "gating_residual false"}},
  });
}

TEST_CASE("moekit-layer: backend and dtype") {
  const Case c;
  {  // without the keys: host fp32, recorded in the output's metadata and the summary line
    Harness h(c);
    nlohmann::json j = c.config();
    j.erase("backend");
    j.erase("dtype");
    h.write_config(j);
    const Run r = h.run();
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    CHECK(r.out.find("moekit-layer: host fp32, 6 tokens") == 0);
    const auto meta = nlohmann::json::parse(moekit::io::read_safetensors(h.out).metadata().at("config"));
    CHECK(meta.at("backend") == "host");
    CHECK(meta.at("dtype") == "fp32");
    CHECK(meta == c.config());
  }
  {  // host bf16 (backend::Host<bf16>): the same routing, and every output within bf16 rounding of host fp32's
    Harness fp32(c), bf16(c);
    nlohmann::json j = c.config();
    j["dtype"] = "bf16";
    bf16.write_config(j);
    const Run r32 = fp32.run(), r16 = bf16.run();
    REQUIRE_MESSAGE(r32.rc == 0, r32.err);
    REQUIRE_MESSAGE(r16.rc == 0, r16.err);
    CHECK(r16.out.find("moekit-layer: host bf16, 6 tokens") == 0);
    CHECK(r16.out.find("bf16 GEMM: ") != std::string::npos);
    const auto a = moekit::io::read_safetensors(fp32.out), b = moekit::io::read_safetensors(bf16.out);
    CHECK(nlohmann::json::parse(b.metadata().at("config")).at("dtype") == "bf16");
    CHECK(a.get_i32("topk.indices", {c.T, c.K}) == b.get_i32("topk.indices", {c.T, c.K}));
    for (const std::string& name : a.names()) {
      CAPTURE(name);
      if (a.info(name).dtype != moekit::io::Dtype::kF32) continue;
      const auto shape = a.info(name).shape;
      const auto ref = a.get_f32(name, shape);
      CHECK(rel_error(b.get_f32(name, shape), std::vector<double>(ref.begin(), ref.end())) < 1e-2);
    }
  }
  // The unit tests are built without MOEKIT_LAYER_WITH_CUDA (g++, no cuda_layer_*.cu): a CUDA config is
  // a config error naming the backend, whatever the dtype, before any input is read.
  if constexpr (!moekit_layer::kWithCuda) {
    auto cuda = [&](const char* dtype) {
      return ::with_config(c, [dtype](nlohmann::json& j) {
        j["backend"] = "cuda";
        j["dtype"] = dtype;
      });
    };
    auto no_input = [](std::function<void(Harness&)> setup) {
      return [setup](Harness& h) {
        setup(h);
        fs::remove(h.in);
      };
    };
    const std::vector<std::string> message{"cfg.json", "moekit::ConfigError: backend = \"cuda\"",
                                           "this moekit-layer was built without CUDA"};
    check_errors(c, {{"cuda fp32 without CUDA", cuda("fp32"), message},
                     {"cuda bf16 without CUDA", cuda("bf16"), message},
                     {"cuda without CUDA, no input file", no_input(cuda("bf16")), message}});
  }
}

TEST_CASE("moekit-layer: MoE++ config and input errors exit 2 with a message") {
  Case m;  // 4 FFN + zero + copy + 2 constant experts (N_E = 8), gating residual
  m.Z = 1, m.C = 1, m.Q = 2, m.residual = true, m.tau = 0.5;
  auto with_config = [&](std::function<void(nlohmann::json&)> edit) { return ::with_config(m, std::move(edit)); };
  auto with_tensors = [&](std::function<void(Tensors&, Shapes&)> edit) { return ::with_tensors(m, std::move(edit)); };
  auto resize = [](const char* name, std::vector<std::int64_t> shape) {
    return [name, shape](Tensors& t, Shapes& s) {
      s[name] = shape;
      t[name].resize(std::size_t(std::accumulate(shape.begin(), shape.end(), std::int64_t(1), std::multiplies<>())), 0.25);
    };
  };
  {  // the valid base case runs
    const Harness h(m);
    const Run r = h.run();
    REQUIRE_MESSAGE(r.rc == 0, r.err);
  }
  check_errors(m, {
      {"missing constant.1.v", with_tensors([](Tensors& t, Shapes&) { t.erase("constant.1.v"); }),
       {"in.safetensors", "no tensor named 'constant.1.v'"}},
      {"missing constant.0.wc.weight", with_tensors([](Tensors& t, Shapes&) { t.erase("constant.0.wc.weight"); }),
       {"no tensor named 'constant.0.wc.weight'"}},
      {"wrong constant wc shape", with_tensors(resize("constant.0.wc.weight", {3, 8})),
       {"tensor 'constant.0.wc.weight'", "expected [2, 8], found [3, 8]"}},
      {"constant v not a vector", with_tensors(resize("constant.1.v", {1, 8})),
       {"tensor 'constant.1.v'", "expected [8], found [1, 8]"}},
      {"gate.weight for the FFN experts only", with_tensors(resize("gate.weight", {4, 8})),
       {"tensor 'gate.weight'", "expected [8, 8], found [4, 8]"}},
      {"missing prev_logits", with_tensors([](Tensors& t, Shapes&) { t.erase("prev_logits"); }),
       {"no tensor named 'prev_logits'"}},
      {"wrong prev_logits shape", with_tensors(resize("prev_logits", {6, 7})),
       {"tensor 'prev_logits'", "expected [6, 8], found [6, 7]"}},
      {"missing gate_residual.weight", with_tensors([](Tensors& t, Shapes&) { t.erase("gate_residual.weight"); }),
       {"no tensor named 'gate_residual.weight'"}},
      {"wrong gate_residual shape", with_tensors(resize("gate_residual.weight", {8, 4})),
       {"tensor 'gate_residual.weight'", "expected [8, 8], found [8, 4]"}},
      {"one constant expert too many", with_tensors([](Tensors& t, Shapes& s) {
         t["constant.2.v"] = t["constant.0.v"];
         s["constant.2.v"] = s["constant.0.v"];
       }),
       {"'constant.2.v' is not an input", "constant.{0..1}.wc.weight/v"}},
      {"non-finite prev_logits", with_tensors([](Tensors& t, Shapes&) { t["prev_logits"][10] = INFINITY; }),
       {"router logits of token 1 are not finite"}},
      {"negative num_copy_experts", with_config([](nlohmann::json& j) { j["num_copy_experts"] = -1; }),
       {"cfg.json", "num_copy_experts = -1", "must be >= 0"}},
      {"fractional num_zero_experts", with_config([](nlohmann::json& j) { j["num_zero_experts"] = 1.5; }),
       {"num_zero_experts", "must be a JSON integer"}},
      {"string num_constant_experts", with_config([](nlohmann::json& j) { j["num_constant_experts"] = "2"; }),
       {"num_constant_experts", "must be a JSON integer"}},
      {"tau = 0", with_config([](nlohmann::json& j) { j["tau"] = 0; }), {"tau = 0", "must be finite and > 0"}},
      {"negative tau", with_config([](nlohmann::json& j) { j["tau"] = -0.5; }), {"tau = -0.5", "> 0"}},
      {"string tau", with_config([](nlohmann::json& j) { j["tau"] = "1"; }), {"tau", "must be a JSON number"}},
      {"number for gating_residual", with_config([](nlohmann::json& j) { j["gating_residual"] = 1; }),
       {"gating_residual", "true or false"}},
      {"top_k > all experts", with_config([](nlohmann::json& j) { j["top_k"] = 9; }),
       {"top_k = 9", "number of experts = 8"}},
      {"fewer constant experts in the config than in the file", with_config([](nlohmann::json& j) { j["num_constant_experts"] = 1; }),
       {"tensor 'prev_logits'", "expected [6, 7], found [6, 8]"}},
  });
}

TEST_CASE("moekit-layer: --help prints the usage and exits 0") {
  const Harness h;
  const Run r = h.run(std::vector<std::string>{"--help"});
  CHECK(r.rc == 0);
  CHECK(r.out.find("usage: moekit-layer --config") != std::string::npos);
}
