// The moekit-layer harness, run in-process: its outputs against an independent double-precision
// reference written here (loops, no library code), its gradients against finite differences of that
// reference, and exit code 2 with a useful message for every class of bad input. The reference covers
// MoE++ (arXiv 2410.07348) too: zero, copy and constant experts, tau, its capacities, the gating residual.
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

namespace {

namespace fs = std::filesystem;
using Tensors = std::map<std::string, std::vector<double>>;  // values exactly representable in float
using Shapes = std::map<std::string, std::vector<std::int64_t>>;

struct Case {
  const char* name = "softmax top-2 swiglu";
  int T = 6, D = 8, F = 5, N = 4, K = 2;  // N: FFN experts
  int Z = 0, C = 0, Q = 0;                // MoE++ zero, copy and constant experts
  std::string router = "softmax", act = "swiglu";
  bool renorm = false, residual = false, bias = false;  // bias: router::BiasBalanced ("expert_bias")
  double capacity = 0.0, lbl = 0.01, z = 0.001, tau = 1.0, rate = 1e-3;
  std::uint64_t seed = 7;

  int NE() const { return N + Z + C + Q; }  // logits, indices and counts: FFN, zero, copy, constant
  nlohmann::json config() const {
    return {{"d_model", D},         {"d_expert", F},           {"num_ffn_experts", N},  {"num_zero_experts", Z},
            {"num_copy_experts", C}, {"num_constant_experts", Q}, {"top_k", K},        {"router", router},
            {"gating_residual", residual}, {"renormalize", renorm}, {"activation", act}, {"capacity_factor", capacity},
            {"lbl_coef", lbl},      {"zloss_coef", z},         {"tau", tau},            {"backend", "host"},
            {"dtype", "fp32"},      {"expert_bias", bias},     {"bias_update_rate", rate}};
  }
  std::vector<std::string> params() const {
    std::vector<std::string> p{"gate.weight"};
    for (int e = 0; e < N; ++e)
      for (const char* w : {"w1", "w2", "w3"})
        if (w[1] != '3' || act == "swiglu") p.push_back("experts." + std::to_string(e) + "." + w + ".weight");
    for (int j = 0; j < Q; ++j)
      for (const char* w : {"wc.weight", "v"}) p.push_back("constant." + std::to_string(j) + "." + w);
    if (residual) p.push_back("gate_residual.weight");
    return p;
  }
  Shapes shapes() const {
    Shapes s{{"x", {T, D}}, {"dy", {T, D}}};
    if (residual) s["prev_logits"] = {T, NE()};
    if (bias) s["gate.e_score_correction_bias"] = {NE()};
    for (const auto& p : params()) {
      if (p == "gate.weight") s[p] = {NE(), D};
      else if (p == "gate_residual.weight") s[p] = {NE(), NE()};
      else if (p.find("wc.weight") != std::string::npos) s[p] = {2, D};
      else if (p.find(".v") != std::string::npos) s[p] = {D};
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
      const bool data = name == "x" || name == "dy" || name == "prev_logits";
      // The biases at the scores' scale (about 1 / N_E), so they change some selections.
      const double bound = name == "gate.e_score_correction_bias" ? 0.3 : data ? 1.0 : 1.0 / std::sqrt(double(shape.back()));
      const auto numel = std::accumulate(shape.begin(), shape.end(), std::int64_t(1), std::multiplies<>());
      for (std::int64_t i = 0; i < numel; ++i) t[name].push_back(uniform(bound));
    }
    return t;
  }
};

struct Ref {
  std::vector<double> y, logits, gates;
  std::vector<int> idx, counts, routed;
  double lbl = 0, zloss = 0, loss = 0, min_gap = 1e9;
};

// DESIGN §2-§4 written out directly for one token at a time, in double.
Ref reference(const Case& c, const Tensors& t) {
  const int T = c.T, D = c.D, F = c.F, N = c.N, K = c.K, NE = c.NE(), NZC = c.Z + c.C + c.Q;
  const auto &x = t.at("x"), &dy = t.at("dy"), &wg = t.at("gate.weight");
  Ref r;
  r.y.assign(T * D, 0.0);
  r.logits.assign(T * NE, 0.0);
  r.gates.assign(T * K, 0.0);
  r.idx.assign(T * K, 0);
  r.routed.assign(NE, 0);
  std::vector<double> score(T * NE), P(T * NE);
  for (int tk = 0; tk < T; ++tk) {
    double* l = &r.logits[tk * NE];
    for (int i = 0; i < NE; ++i) {
      for (int d = 0; d < D; ++d) l[i] += wg[i * D + d] * x[tk * D + d];
      if (c.residual)  // MoE++ gating residual: + W_g prev_logits
        for (int j = 0; j < NE; ++j) l[i] += t.at("gate_residual.weight")[i * NE + j] * t.at("prev_logits")[tk * NE + j];
    }
    const double m = *std::max_element(l, l + NE);
    double sum = 0, ssum = 0;
    for (int i = 0; i < NE; ++i) sum += std::exp(l[i] - m);
    const double lse = m + std::log(sum);
    r.zloss += lse * lse / T;
    for (int i = 0; i < NE; ++i) {
      score[tk * NE + i] = c.router == "softmax" ? std::exp(l[i] - lse) : 1.0 / (1.0 + std::exp(-l[i]));
      ssum += score[tk * NE + i];
    }
    for (int i = 0; i < NE; ++i) P[tk * NE + i] = c.router == "softmax" ? score[tk * NE + i] : score[tk * NE + i] / ssum;
    // The selection ranks score + bias (router::BiasBalanced); the gates below use the score alone.
    auto chosen = [&](int i) { return score[tk * NE + i] + (c.bias ? t.at("gate.e_score_correction_bias")[i] : 0.0); };
    std::vector<int> order(NE);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return chosen(a) > chosen(b); });
    if (K < NE) r.min_gap = std::min(r.min_gap, chosen(order[K - 1]) - chosen(order[K]));
    double picked = 0;
    for (int j = 0; j < K; ++j) {
      r.idx[tk * K + j] = order[j];
      picked += (r.gates[tk * K + j] = score[tk * NE + order[j]]);
      ++r.routed[order[j]];
    }
    if (c.router == "sigmoid" || c.renorm)
      for (int j = 0; j < K; ++j) r.gates[tk * K + j] /= picked;
  }
  // Capacity: each expert keeps its C highest-scoring slots (earlier token first on ties), with MoE++'s
  // C_FFN and C_ZC when there are zero-computation experts.
  std::vector<bool> kept(T * K, true);
  if (c.capacity > 0) {
    const double g = c.capacity, denom = c.tau * N + NZC;
    const int cap_ffn = int(std::ceil(NZC == 0 ? g * K * T / NE : g * c.tau * K * T / denom));
    const int cap_zc = int(std::ceil(NZC == 0 ? g * K * T / NE : g * K * T / denom));
    for (int e = 0; e < NE; ++e) {
      std::vector<int> slots;
      for (int s = 0; s < T * K; ++s)
        if (r.idx[s] == e) slots.push_back(s);
      std::stable_sort(slots.begin(), slots.end(),
                       [&](int a, int b) { return score[(a / K) * NE + e] > score[(b / K) * NE + e]; });
      for (std::size_t q = std::size_t(e < N ? cap_ffn : cap_zc); q < slots.size(); ++q) kept[slots[q]] = false;
    }
  }
  r.counts.assign(NE, 0);
  for (int s = 0; s < T * K; ++s) {
    if (!kept[s]) continue;
    const int tk = s / K, e = r.idx[s];
    const double* xt = &x[tk * D];
    ++r.counts[e];
    std::vector<double> o(D, 0.0);  // E_e(x_t)
    if (e < N) {
      const auto& w1 = t.at("experts." + std::to_string(e) + ".w1.weight");
      const auto& w2 = t.at("experts." + std::to_string(e) + ".w2.weight");
      std::vector<double> a(F);
      for (int f = 0; f < F; ++f) {
        double h1 = 0, h3 = 0;
        for (int d = 0; d < D; ++d) h1 += w1[f * D + d] * xt[d];
        if (c.act == "swiglu") {
          const auto& w3 = t.at("experts." + std::to_string(e) + ".w3.weight");
          for (int d = 0; d < D; ++d) h3 += w3[f * D + d] * xt[d];
          a[f] = h1 / (1.0 + std::exp(-h1)) * h3;
        } else if (c.act == "gelu") {
          a[f] = 0.5 * h1 * (1.0 + std::erf(h1 / std::sqrt(2.0)));
        } else {
          a[f] = std::max(h1, 0.0);
        }
      }
      for (int d = 0; d < D; ++d)
        for (int f = 0; f < F; ++f) o[d] += w2[d * F + f] * a[f];
    } else if (e < N + c.Z) {
      // zero expert: E(x) = 0
    } else if (e < N + c.Z + c.C) {
      std::copy(xt, xt + D, o.begin());  // copy expert: E(x) = x
    } else {  // constant expert: a1 x + a2 v, [a1, a2] = softmax(Wc x)
      const std::string pre = "constant." + std::to_string(e - N - c.Z - c.C) + ".";
      const auto &wc = t.at(pre + "wc.weight"), &v = t.at(pre + "v");
      double z1 = 0, z2 = 0;
      for (int d = 0; d < D; ++d) z1 += wc[d] * xt[d], z2 += wc[D + d] * xt[d];
      const double a1 = 1.0 / (1.0 + std::exp(z2 - z1)), a2 = 1.0 - a1;
      for (int d = 0; d < D; ++d) o[d] = a1 * xt[d] + a2 * v[d];
    }
    for (int d = 0; d < D; ++d) r.y[tk * D + d] += r.gates[s] * o[d];
  }
  // MoE++ LBL (Switch's when tau = 1): N_E sum eta_i f_i P_i, f from the routed (pre-capacity) counts,
  // P the mean router probability, eta_i = 1 for FFN experts and tau for the others.
  for (int i = 0; i < NE; ++i) {
    double p = 0;
    for (int tk = 0; tk < T; ++tk) p += P[tk * NE + i] / T;
    r.lbl += NE * (i < N ? 1.0 : c.tau) * (double(r.routed[i]) / (K * T)) * p;
  }
  for (int i = 0; i < T * D; ++i) r.loss += r.y[i] * dy[i];
  r.loss += c.lbl * r.lbl + c.z * r.zloss;
  return r;
}

// max |a - b| / max |b|: the error relative to the tensor's scale.
double rel_error(const std::vector<float>& a, const std::vector<double>& b) {
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
      if (as_bf16.count(name)) w.add_f32_as_bf16(name, s.at(name), f);
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

std::vector<Case> cases() {
  Case a;  // softmax top-2 swiglu, dropless
  Case b;
  b.name = "softmax top-2 gelu renormalised";
  b.act = "gelu", b.renorm = true, b.lbl = 0.1, b.z = 0.0;
  Case c;
  c.name = "sigmoid top-2 relu with capacity 0.75";
  c.router = "sigmoid", c.act = "relu", c.capacity = 0.75;
  Case d;
  d.name = "softmax top-3 swiglu with capacity 1.0";
  d.K = 3, d.capacity = 1.0, d.z = 0.01;
  // MoE++. C_FFN = ceil(1.25 * 0.5 * 2 * 10 / (0.5 * 3 + 4)) = 3, C_ZC = ceil(1.25 * 2 * 10 / 5.5) = 5 (the
  // plain ceil(gamma k T / N_E) = 4 would keep 4 of expert 0's 4 slots; here FFN slots are dropped).
  Case e;
  e.name = "MoE++ softmax top-2 swiglu, 3 FFN + zero + copy + 2 constant, tau 0.5, capacity 1.25";
  e.T = 10, e.N = 3, e.Z = 1, e.C = 1, e.Q = 2, e.tau = 0.5, e.capacity = 1.25, e.lbl = 0.1;
  Case f;
  f.name = "MoE++ sigmoid top-3 gelu with gating residual, 4 FFN + zero + 2 copy + constant, tau 1.5";
  f.router = "sigmoid", f.act = "gelu", f.K = 3, f.Z = 1, f.C = 2, f.Q = 1, f.tau = 1.5, f.residual = true;
  f.lbl = 0.05, f.z = 0.01, f.seed = 3;  // seed 3: every expert gets a slot
  Case g;
  g.name = "MoE++ softmax top-2 relu renormalised with gating residual, 2 FFN + zero + copy + constant, capacity 1.0";
  g.act = "relu", g.renorm = true, g.T = 9, g.N = 2, g.Z = g.C = g.Q = 1, g.tau = 2.0, g.capacity = 1.0;
  g.residual = true;  // C_FFN = ceil(2 * 18 / 7) = 6, C_ZC = ceil(18 / 7) = 3 (plain: 4): the zero expert drops
  Case h;
  h.name = "sigmoid top-2 swiglu with gating residual, FFN experts only";
  h.router = "sigmoid", h.residual = true, h.z = 0.01;
  Case i;
  i.name = "expert bias (aux-loss-free balancing): softmax top-2 swiglu renormalised, lbl 0";
  i.bias = true, i.renorm = true, i.lbl = 0.0, i.rate = 0.01;
  Case j;
  j.name = "expert bias: sigmoid top-2 gelu with gating residual";
  j.bias = true, j.router = "sigmoid", j.act = "gelu", j.residual = true, j.seed = 5;
  return {a, b, c, d, e, f, g, h, i, j};
}

}  // namespace

TEST_CASE("moekit-layer: outputs match an independent double reference") {
  for (const Case& c : cases()) {
    const std::string name = c.name;
    CAPTURE(name);
    const Harness h(c);
    const Tensors in = c.inputs();
    const Ref ref = reference(c, in);
    REQUIRE(ref.min_gap > 1e-4);  // no near-ties in top-k, so the routing is unambiguous
    // Every kind of expert the case has does work, so each one's forward and backward is checked.
    for (const auto& [first, count] : {std::pair{0, c.N}, {c.N, c.Z}, {c.N + c.Z, c.C}, {c.N + c.Z + c.C, c.Q}})
      if (count > 0) CHECK(std::accumulate(ref.counts.begin() + first, ref.counts.begin() + first + count, 0) > 0);

    const Run r = h.run();
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    CHECK(r.err.empty());
    const auto f = moekit::io::read_safetensors(h.out);
    std::set<std::string> expected{"y", "dx", "logits", "topk.indices", "topk.gates", "expert.counts", "aux.lbl", "aux.zloss"};
    for (const auto& p : c.params()) expected.insert("grad." + p);
    if (c.residual) expected.insert("grad.prev_logits");
    if (c.bias) expected.insert("expert_bias.update");
    const auto names = f.names();
    CHECK(std::set<std::string>(names.begin(), names.end()) == expected);
    CHECK(f.metadata().at("format") == "moekit-layer");
    CHECK(nlohmann::json::parse(f.metadata().at("config")) == c.config());

    const std::int64_t T = c.T, D = c.D, N = c.NE(), K = c.K;
    CHECK(rel_error(f.get_f32("y", {T, D}), ref.y) < 1e-5);
    CHECK(rel_error(f.get_f32("logits", {T, N}), ref.logits) < 1e-5);
    CHECK(rel_error(f.get_f32("topk.gates", {T, K}), ref.gates) < 1e-5);
    const auto idx = f.get_i32("topk.indices", {T, K});
    CHECK(std::vector<int>(idx.begin(), idx.end()) == ref.idx);
    const auto counts = f.get_i32("expert.counts", {N});
    CHECK(std::vector<int>(counts.begin(), counts.end()) == ref.counts);
    CHECK(f.get_f32("aux.lbl", {1})[0] == doctest::Approx(ref.lbl).epsilon(1e-5));
    CHECK(f.get_f32("aux.zloss", {1})[0] == doctest::Approx(ref.zloss).epsilon(1e-5));
    if (c.capacity > 0) CHECK(std::accumulate(ref.counts.begin(), ref.counts.end(), 0) < c.T * c.K);  // some drops
    if (c.bias) {
      // The update this forward's routed counts apply: rate · sign(mean − c_i), worked out here.
      const auto upd = f.get_f32("expert_bias.update", {N});
      const double mean = double(c.T * c.K) / double(N);
      for (int e = 0; e < N; ++e) {
        const double want = ref.routed[e] < mean ? c.rate : ref.routed[e] > mean ? -c.rate : 0.0;
        CHECK(double(upd[e]) == doctest::Approx(want));
      }
      Case plain = c;  // and the bias changed some selection
      plain.bias = false;
      Tensors no_bias = in;
      no_bias.erase("gate.e_score_correction_bias");
      CHECK(reference(plain, no_bias).idx != ref.idx);
    }

    // Gradients of L = sum(y * dy) + lbl_coef * LBL + zloss_coef * zloss by central differences of the
    // reference (f_i is piecewise constant, so this is also "f carries no gradient").
    std::vector<std::pair<std::string, std::string>> wrt{{"x", "dx"}};
    if (c.residual) wrt.push_back({"prev_logits", "grad.prev_logits"});
    for (const auto& p : c.params()) wrt.push_back({p, "grad." + p});
    for (const auto& [name, grad_name] : wrt) {
      CAPTURE(grad_name);
      std::vector<double> fd(in.at(name).size());
      Tensors t = in;
      for (std::size_t i = 0; i < fd.size(); ++i) {
        const double h0 = t[name][i], step = 1e-6;
        t[name][i] = h0 + step;
        const double up = reference(c, t).loss;
        t[name][i] = h0 - step;
        const double down = reference(c, t).loss;
        t[name][i] = h0;
        fd[i] = (up - down) / (2 * step);
      }
      CHECK(rel_error(f.get_f32(grad_name, c.shapes().at(name)), fd) < 1e-4);
    }
    // Only the three inputs and the output are left in the folder: no temporary files.
    std::set<std::string> files;
    for (const auto& e : fs::directory_iterator(h.dir)) files.insert(e.path().filename().string());
    CHECK(files == std::set<std::string>{"cfg.json", "in.safetensors", "out.safetensors"});
  }
}

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
