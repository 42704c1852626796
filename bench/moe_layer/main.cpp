// bench_moe_layer: time an MoE layer's forward and forward+backward on the shapes of DESIGN §10 and
// compare with the ceiling of one dense GEMM of equal FLOPs measured in the same run.
//
//   OMP_WAIT_POLICY=passive bench_moe_layer [--backend host] [--quick] [--reps N] [--json out.json] [--dtype fp32|bf16|all]
//   bench_moe_layer --rss train|eval   (peak RSS of a training or an evaluation-mode run)
//   bench_moe_layer --backend cuda [--quick] [--reps N] [--json out.json] [--gemm auto|grouped|streams|lt|all]
//                   [--dtype bf16|fp32] [--shape mixtral|olmoe|qwen3-30b-a3b|deepseek-v3-routed ...]
//                   [--max-gib G] [--time-budget S]   (cuda: the JSON is rewritten after every row; see cuda_bench.cu)
//
// Host rows: fp32 and bf16 (backend::Host<bf16>, against a bf16 GEMM's ceiling), SwiGLU, softmax top-k; then decode rows (T = 1, 8, 64 tokens, evaluation mode): µs
// per layer call and the expert weights it must read against the machine's read bandwidth. CUDA rows: cuda_bench.cu (built when CUDA is enabled).
// FLOPs: forward 6·T·k·d·d_expert, forward+backward 18·T·k·d·d_expert (the router, 2·T·d·N_E and
// x3 with backward, is reported separately and not in the ratio).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <tuple>
#include <utility>
#include <memory>
#include <moekit/backend/host/convert.hpp>
#include <moekit/backend/host/gemm_bf16.hpp>
#include <moekit/backend/host/gemm_library.hpp>
#include <moekit/layer/any_layer.hpp>
#include <moekit/moe_layer.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "routing_shares.hpp"

#ifdef MOEKIT_BENCH_WITH_CUDA
#include "cuda_bench.hpp"
#endif

using namespace moekit;
using Clock = std::chrono::steady_clock;

namespace {

struct Shape {
  const char* name;
  std::int64_t tokens, d, f, experts, k;
};
// DESIGN §10 host shapes, and a tiny one for the smoke test.
const Shape kShapes[] = {{"cpu-mixtral-mini", 2048, 512, 1024, 8, 2}, {"cpu-fine", 4096, 256, 128, 64, 8}};
const Shape kQuick[] = {{"quick", 256, 64, 128, 8, 2}};

template <class F>
double median_ms(F&& fn, int reps) {
  fn();  // warm-up: first touch of buffers, BLAS thread start
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Routing: "uniform" = random router weights on random x; "skewed" = every token carries a constant
// feature (x[:, 0] = 1) and the router weight of that feature is +bias for the first N_FFN/8 experts
// (at least 1), so about half the slots land on 1/8 of the experts. The measured share is reported.
void set_routing(std::vector<float>& router, std::vector<float>& x, const Shape& s, bool skewed) {
  if (!skewed) return;
  const std::int64_t hot = std::max<std::int64_t>(1, s.experts / 8);
  for (std::int64_t t = 0; t < s.tokens; ++t) x[t * s.d] = 1.0f;
  const float bias = 3.0f / float(s.k);  // tuned so about half the slots go to the hot experts
  for (std::int64_t e = 0; e < hot; ++e) router[e * s.d] = bias;
}

struct Row {
  std::string shape, routing, experts, dtype;
  double tau = 1, gamma = 0, fwd_ms = 0, fb_ms = 0, ceiling_gflops = 0, hot_share = 0, zc_share = 0;
  std::int64_t expert_flops = 0, ffn_rows = 0, router_flops_fwd = 0;
  double flops_fwd = 0;
};

// Medians of two measurements taken in turn (a, b, a, b, ...): on a shared machine both see the same
// neighbours, so their ratio holds when either alone drifts.
template <class A, class B>
std::pair<double, double> alternated_median_ms(A&& a, B&& b, int reps) {
  a(), b();  // warm-up
  std::vector<double> ta, tb;
  for (int r = 0; r < reps; ++r) {
    for (auto [fn, out] : {std::pair<std::function<void()>, std::vector<double>*>{a, &ta}, {b, &tb}}) {
      const auto t0 = Clock::now();
      fn();
      out->push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
  }
  std::sort(ta.begin(), ta.end()), std::sort(tb.begin(), tb.end());
  return {ta[ta.size() / 2], tb[tb.size() / 2]};
}

// One dense GEMM of the forward's FLOPs ([T·k, d] x [d, 3·d_expert]) on the same threads, in the
// layer's storage type (bf16: bf16 operands, fp32 accumulation, as the layer's GEMMs): the ceiling.
// Each row measures it in turn with its own forward+backward reps.
template <class V>
struct Ceiling {
  std::int64_t m, n, k;
  std::vector<V> a, b;
  std::vector<float> c;
  explicit Ceiling(const Shape& s)
      : m(s.tokens * s.k), n(3 * s.f), k(s.d), a(std::size_t(m * k), V(0.01f)), b(std::size_t(k * n), V(0.01f)), c(std::size_t(m * n)) {}
  void operator()() { backend::host::gemm(false, false, m, n, k, 1.f, a.data(), b.data(), 0.f, c.data()); }
  double gflops(double ms) const { return 2.0 * double(m) * double(n) * double(k) / (ms * 1e6); }
};

// Through the type-erased layer (layer/any_layer.hpp), as programs that choose the layer at run time
// use it: one virtual call per forward or backward, nothing measurable at these sizes.
template <class Layer>
Row run(const Shape& s, const MoeConfig& cfg, bool skewed, int reps, const char* experts_name) {
  using V = typename Layer::storage_type;
  const auto erased = erase<Layer>(cfg);
  AnyMoeLayer<typename Layer::backend_type>& layer = *erased;
  layer.init_params(1);
  // Two input sets, alternated, so a rep does not find the previous rep's x in cache.
  std::vector<V> x[2], y(s.tokens * s.d), dx(s.tokens * s.d), dy(s.tokens * s.d);
  SplitMix64 rng(7);
  auto w = layer.weights();
  for (auto& v : x) {
    std::vector<float> f(s.tokens * s.d);
    for (auto& e : f) e = float(rng.uniform(-1, 1));
    set_routing(w["router"], f, s, skewed);
    v.resize(f.size());
    backend::host::convert(f.data(), v.data(), std::int64_t(f.size()));
  }
  layer.load_weights(w);
  for (auto& e : dy) e = V(float(rng.uniform(-1, 1)));
  int which = 0;
  auto fwd = [&] {
    layer.forward(MatrixView<const V>(x[which].data(), {s.tokens, s.d}), MatrixView<V>(y.data(), {s.tokens, s.d}));
    which ^= 1;
  };
  Row r;
  r.dtype = std::is_same_v<V, bf16> ? "bf16" : "fp32";
  r.shape = s.name;
  r.routing = skewed ? "skewed" : "uniform";
  r.experts = experts_name;
  r.tau = cfg.tau;
  r.gamma = cfg.capacity_factor;
  r.fwd_ms = median_ms(fwd, reps);
  Ceiling<V> ceiling(s);
  double ceiling_ms = 0;
  std::tie(r.fb_ms, ceiling_ms) = alternated_median_ms([&] {
    fwd();
    layer.backward(MatrixView<const V>(dy.data(), {s.tokens, s.d}), MatrixView<V>(dx.data(), {s.tokens, s.d}));
  }, [&] { ceiling(); }, reps);
  r.ceiling_gflops = ceiling.gflops(ceiling_ms);
  r.expert_flops = layer.expert_gemm_flops();
  r.ffn_rows = layer.ffn_rows();
  // Router logits GEMM, 2·T·d·N over all N experts (FFN and zero-computation); not in the GFLOP/s.
  r.router_flops_fwd = 2 * s.tokens * s.d * (cfg.num_ffn_experts + cfg.num_zero_experts + cfg.num_copy_experts +
                                             cfg.num_constant_experts);
  const RoutingShares shares = routing_shares(layer.routed_counts(), cfg.num_ffn_experts);
  r.hot_share = shares.hot, r.zc_share = shares.zc;
  // Nominal: k FFN slots per token, plus the shared experts' FFN on every token.
  const double shared = double(read_options<experts::SharedOptions>(cfg).width(cfg));
  r.flops_fwd = 6.0 * double(s.tokens) * double(s.d) * (double(s.k) * double(s.f) + shared);
  return r;
}

// Read bandwidth of this machine on these threads: one pass of Σ over a 512 MiB buffer (far beyond the
// caches). Each decode row measures it in turn with its own calls.
struct ReadPass {
  std::vector<float> v = std::vector<float>(std::size_t(1) << 27, 1.0f);
  double sink = 0;
  void operator()() {
    const std::size_t n = v.size();
    double s = 0;
    // 16 independent sums per thread: the loop is bound by the loads, not by one add's latency.
#pragma omp parallel reduction(+ : s)
    {
      float acc[16] = {};
#pragma omp for schedule(static)
      for (std::size_t b = 0; b < n / 16; ++b)
        for (std::size_t j = 0; j < 16; ++j) acc[j] += v[b * 16 + j];
      for (float a : acc) s += double(a);
    }
    sink += s;
  }
  double gbps(double ms) const { return double(v.size() * sizeof(float)) / (ms * 1e6); }
};

struct DecodeRow {
  std::string shape;
  std::int64_t tokens = 0, experts_touched = 0;
  double us = 0, weight_bytes = 0, gbps = 0, read_gbps = 0;
};
// Forward of T tokens in evaluation mode (decode): the experts the T tokens reach must each be read
// whole (w1, w3, w2: 3·d·d_expert floats), and the router (N·d); a layer call is bandwidth-bound. As
// in a model, the calls go round a stack of layers whose weights together are 4x a 64 MiB cache, so
// a call does not find its weights still cached from the previous one.
template <class Layer>
DecodeRow decode(const Shape& s, std::int64_t T, int reps, ReadPass& read) {
  MoeConfig c;
  c.d_model = s.d, c.d_expert = s.f, c.num_ffn_experts = s.experts, c.top_k = s.k;
  const double layer_bytes = double(sizeof(float)) * double(s.experts) * (3.0 * double(s.d) * double(s.f) + double(s.d));
  const int n = int(std::max(1.0, std::ceil(4.0 * 64.0 * 1024 * 1024 / layer_bytes)));
  std::vector<std::unique_ptr<AnyMoeLayer<backend::Host<float>>>> layers;
  for (int i = 0; i < n; ++i) {
    layers.push_back(erase<Layer>(c));
    layers.back()->init_params(3);  // the same weights: the same experts touched by every layer
    layers.back()->set_training(false);
  }
  std::vector<float> x(std::size_t(T * s.d)), y(x.size());
  SplitMix64 rng(11);
  for (auto& e : x) e = float(rng.uniform(-1, 1));
  DecodeRow r;
  r.shape = s.name, r.tokens = T;
  const auto [calls_ms, read_ms] = alternated_median_ms([&] {
    for (auto& l : layers) l->forward(MatrixView<const float>(x.data(), {T, s.d}), MatrixView<float>(y.data(), {T, s.d}));
  }, [&] { read(); }, reps);
  r.us = 1e3 / n * calls_ms;
  r.read_gbps = read.gbps(read_ms);
  for (auto cnt : layers.front()->routed_counts()) r.experts_touched += cnt > 0 ? 1 : 0;
  r.weight_bytes = double(sizeof(float)) * (double(r.experts_touched) * 3.0 * double(s.d) * double(s.f) + double(s.experts * s.d));
  r.gbps = r.weight_bytes / (r.us * 1e3);
  return r;
}

MoeConfig base_config(const Shape& s) {
  MoeConfig c;
  c.d_model = s.d;
  c.d_expert = s.f;
  c.num_ffn_experts = s.experts;
  c.top_k = s.k;
  c.lbl_coef = 0.01;
  return c;
}

// Peak resident memory of this process so far (VmHWM), MB.
double peak_rss_mb() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

// --rss train|eval: one cpu-mixtral-mini layer, two forwards (and backwards, in training mode), then
// the process's peak RSS and the layer's buffers: run once per mode, each in its own process.
int rss_mode(const std::string& mode) {
  using Vanilla = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  const Shape s = kShapes[0];
  MoeConfig c;
  c.d_model = s.d, c.d_expert = s.f, c.num_ffn_experts = s.experts, c.top_k = s.k;
  const double before = peak_rss_mb();
  Vanilla layer(c);
  layer.init_params(1);
  const bool train = mode == "train";
  layer.set_training(train);
  std::vector<float> x(std::size_t(s.tokens * s.d), 0.5f), y(x.size()), dx(x.size());
  SplitMix64 rng(5);
  for (auto& e : x) e = float(rng.uniform(-1, 1));
  for (int i = 0; i < 2; ++i) {
    layer.forward(MatrixView<const float>(x.data(), {s.tokens, s.d}), MatrixView<float>(y.data(), {s.tokens, s.d}));
    if (train) layer.backward(MatrixView<const float>(y.data(), {s.tokens, s.d}), MatrixView<float>(dx.data(), {s.tokens, s.d}));
  }
  std::printf("bench_moe_layer --rss %s: %s, T %lld: peak RSS %.1f MB (%.1f MB before the layer), layer buffers %.1f MB\n",
              mode.c_str(), s.name, (long long)s.tokens, peak_rss_mb(), before, double(layer.buffer_bytes()) / 1e6);
  return 0;
}

// The CPU's model name with its family and model numbers (machines of one name differ: an "AMD EPYC"
// VM was a Zen 4 one day and a Zen 5 the next).
std::string machine() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, name = "unknown", family, model;
  auto value = [&] { return line.substr(line.find(':') + 2); };
  while (std::getline(in, line) && line.find_first_not_of(" \t") != std::string::npos) {
    if (line.rfind("model name", 0) == 0) name = value();
    else if (line.rfind("cpu family", 0) == 0) family = value();
    else if (line.rfind("model\t", 0) == 0) model = value();
  }
  return family.empty() ? name : name + " (family " + family + ", model " + model + ")";
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--backend" && std::string(argv[i + 1]) == "cuda") {
#ifdef MOEKIT_BENCH_WITH_CUDA
      try {
        return run_cuda_bench(argc, argv);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_moe_layer: %s\n", e.what());
        return 2;
      }
#else
      std::fprintf(stderr, "bench_moe_layer: built without CUDA (configure with MOEKIT_ENABLE_CUDA=ON or the cuda preset)\n");
      return 2;
#endif
    }
  bool quick = false, uniform_only = false, decode_only = false;
  int reps = 5;
  std::string json_path, backend = "host", dtype = "all", only_shape;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_moe_layer: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--rss") return rss_mode(next());
    if (a == "--quick") quick = true;
    else if (a == "--uniform-only") uniform_only = true;  // the rows bench/torch_peer compares: no skewed, MoE++ or decode rows
    else if (a == "--decode-only") decode_only = true;    // the decode rows alone
    else if (a == "--reps") reps = std::max(1, std::atoi(next().c_str()));
    else if (a == "--json") json_path = next();
    else if (a == "--backend") backend = next();
    else if (a == "--dtype") dtype = next();
    else if (a == "--shape") only_shape = next();  // one host shape (cpu-mixtral-mini or cpu-fine)
    else {
      std::fprintf(stderr, "usage: bench_moe_layer [--backend host|cuda] [--quick] [--reps N] [--json out.json] [--rss train|eval] "
                           "[--dtype fp32|bf16|all] [--uniform-only] [--decode-only] [--shape cpu-mixtral-mini|cpu-fine] "
                           "(cuda: [--gemm auto|grouped|streams|lt|all] [--dtype bf16|fp32] [--shape NAME] [--max-gib G] [--time-budget S])\n");
      return 2;
    }
  }
  if (backend != "host") {
    std::fprintf(stderr, "bench_moe_layer: --backend must be host or cuda, not %s\n", backend.c_str());
    return 2;
  }
  if (dtype != "fp32" && dtype != "bf16" && dtype != "all") {
    std::fprintf(stderr, "bench_moe_layer: --dtype must be fp32, bf16 or all on the host, not %s\n", dtype.c_str());
    return 2;
  }
  const bool fp32_rows = dtype != "bf16", bf16_rows = dtype != "fp32";
  if (quick) reps = 1;
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  std::printf("bench_moe_layer: backend host %s SwiGLU | %d threads | OMP_WAIT_POLICY=%s | %s\n", dtype == "all" ? "fp32 + bf16" : dtype.c_str(),
              omp_get_max_threads(), wait ? wait : "(default)", machine().c_str());
  std::printf("%s\n", backend::host::gemm_library().line().c_str());
  if (bf16_rows) std::printf("%s\n", backend::host::bf16_gemm().line().c_str());

  using Vanilla = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  using MoePP = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>,
                         experts::Set<experts::Ffn<act::SwiGLU>, experts::Zero, experts::Copy, experts::Constant>>;
  using Bf16 = MoeLayer<backend::Host<bf16>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  std::vector<Row> rows;
  const auto* begin = quick ? std::begin(kQuick) : std::begin(kShapes);
  const auto* end = quick ? std::end(kQuick) : std::end(kShapes);
  for (const Shape* s = begin; s != end; ++s) {
    if ((!only_shape.empty() && only_shape != s->name) || decode_only) continue;
    if (bf16_rows) {  // bf16 first: the same machine state as the fp32 rows that follow
      for (bool skewed : {false, true}) {
        if (skewed && uniform_only) continue;
        rows.push_back(run<Bf16>(*s, base_config(*s), skewed, reps, "ffn"));
      }
    }
    if (!fp32_rows) continue;
    for (bool skewed : {false, true}) {
      if (skewed && uniform_only) continue;
      rows.push_back(run<Vanilla>(*s, base_config(*s), skewed, reps, "ffn"));
    }
    if (s != begin || uniform_only || !only_shape.empty()) continue;  // MoE++ rows on the first shape only
    // MoE++ (8 FFN + 1 zero + 1 copy + 2 constant) against the vanilla layer of the same FFN experts,
    // both with capacity factor 1: tau shrinks C_FFN = ceil(gamma tau k T / (tau N_FFN + N_ZC)).
    MoeConfig v = base_config(*s);
    v.capacity_factor = 1.0;
    rows.push_back(run<Vanilla>(*s, v, false, reps, "ffn"));
    for (double tau : {1.0, 0.75, 0.1}) {
      MoeConfig c = v;
      c.num_zero_experts = 1;
      c.num_copy_experts = 1;
      c.num_constant_experts = 2;
      c.tau = tau;
      rows.push_back(run<MoePP>(*s, c, false, reps, "ffn+1z+1c+2k"));
    }
    // Shared experts (DeepSeek's: 2 of d_expert, every token, weight 1; Qwen2-MoE's gate on top): the
    // same routed experts beside the dropless vanilla row.
    MoeConfig sh = base_config(*s);
    sh.options.set("num_shared_experts", std::int64_t(2)), sh.options.set("shared_gate", true);
    rows.push_back(run<Vanilla>(*s, base_config(*s), false, reps, "ffn"));
    rows.push_back(run<Vanilla>(*s, sh, false, reps, "ffn+2shared"));
    // Expert choice (Zhou et al.): each expert takes ceil(gamma k T / N_E) of the tokens, beside the
    // token-choice row of the same capacity factor 1 (its routing adds a sort per expert).
    MoeConfig ec = v;
    ec.lbl_coef = 0.0, ec.options.set("routing", std::string("expert_choice"));
    rows.push_back(run<Vanilla>(*s, v, false, reps, "ffn"));
    rows.push_back(run<Vanilla>(*s, ec, false, reps, "ffn (EC)"));
  }

  // Decode: a few tokens per call, evaluation mode, many reps (each call is short).
  std::vector<DecodeRow> decodes;
  std::unique_ptr<ReadPass> read;
  if (fp32_rows && !uniform_only) read = std::make_unique<ReadPass>();
  for (const Shape* s = begin; s != end && fp32_rows && !uniform_only; ++s)
    for (std::int64_t T : {1, 8, 64})
      if (only_shape.empty() || only_shape == s->name) decodes.push_back(decode<Vanilla>(*s, T, quick ? 3 : 21, *read));

  std::printf("\n%-17s %-5s %-8s %-13s %5s %5s | %9s %8s %6s | %9s %8s %6s | %8s %6s %6s\n", "shape", "dtype", "routing", "experts",
              "gamma", "tau", "fwd ms", "GFLOP/s", "ratio", "f+b ms", "GFLOP/s", "ratio", "ceiling", "hot", "zc");
  nlohmann::ordered_json out;
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  out["date"] = date;
  out["machine"] = machine();
  out["gemm_library"] = backend::host::gemm_library().line();
  if (bf16_rows) out["bf16_gemm"] = backend::host::bf16_gemm().line();
  out["cores"] = omp_get_num_procs();
  out["threads"] = omp_get_max_threads();
  {
    std::ifstream la("/proc/loadavg");
    std::string l1, l5, l15;
    la >> l1 >> l5 >> l15;
    out["loadavg_at_end"] = l1 + " " + l5 + " " + l15;
  }
  out["omp_wait_policy"] = wait ? wait : "default";
  std::string cmd;
  for (int i = 0; i < argc; ++i) cmd += (i ? " " : "") + std::string(argv[i]);
  out["command"] = cmd;
  out["rows"] = nlohmann::json::array();
  for (const Row& r : rows) {
    const double gf = r.flops_fwd / (r.fwd_ms * 1e6), gfb = 3 * r.flops_fwd / (r.fb_ms * 1e6);
    std::printf("%-17s %-5s %-8s %-13s %5.2f %5.2f | %9.2f %8.1f %6.2f | %9.2f %8.1f %6.2f | %8.1f %6.2f %6.2f\n", r.shape.c_str(),
                r.dtype.c_str(), r.routing.c_str(), r.experts.c_str(), r.gamma, r.tau, r.fwd_ms, gf, gf / r.ceiling_gflops, r.fb_ms, gfb,
                gfb / r.ceiling_gflops, r.ceiling_gflops, r.hot_share, r.zc_share);
    out["rows"].push_back({{"shape", r.shape}, {"dtype", r.dtype}, {"routing", r.routing}, {"experts", r.experts}, {"capacity_factor", r.gamma},
                           {"tau", r.tau}, {"fwd_ms", r.fwd_ms}, {"fwd_gflops_nominal", gf}, {"fwd_ratio", gf / r.ceiling_gflops},
                           {"fwd_bwd_ms", r.fb_ms}, {"fwd_bwd_gflops_nominal", gfb}, {"fwd_bwd_ratio", gfb / r.ceiling_gflops},
                           {"ceiling_gflops", r.ceiling_gflops}, {"hot_expert_share", r.hot_share},
                           {"zc_slot_share", r.zc_share}, {"expert_gemm_flops", r.expert_flops}, {"ffn_rows", r.ffn_rows},
                           {"router_flops_fwd", r.router_flops_fwd}});
  }
  std::printf("\ndecode (evaluation-mode forward of T tokens; weights = the experts the T tokens reach, read whole, + the "
              "router; calls round a stack of layers 4x a 64 MiB cache; read bandwidth measured in turn with each row's calls)\n"
              "%-17s %6s %10s %8s %10s %8s %9s %6s\n",
              "shape", "T", "us/call", "experts", "weight MB", "GB/s", "read GB/s", "ratio");
  out["decode"] = nlohmann::json::array();
  for (const DecodeRow& d : decodes) {
    std::printf("%-17s %6lld %10.1f %8lld %10.2f %8.1f %9.1f %6.2f\n", d.shape.c_str(), (long long)d.tokens, d.us,
                (long long)d.experts_touched, d.weight_bytes / 1e6, d.gbps, d.read_gbps, d.gbps / d.read_gbps);
    out["decode"].push_back({{"shape", d.shape}, {"tokens", d.tokens}, {"us_per_call", d.us}, {"experts_touched", d.experts_touched},
                             {"weight_bytes", d.weight_bytes}, {"gbps", d.gbps}, {"read_gbps", d.read_gbps},
                             {"ratio_to_read_bandwidth", d.gbps / d.read_gbps}});
  }
  std::printf("\nceiling: one GEMM of the forward's FLOPs in the row's dtype (bf16: bf16 operands, fp32 accumulation), measured in turn with the row's f+b reps.\n"
              "GFLOP/s are nominal: 6·T·k·d·d_expert (forward) and 18·T·k·d·d_expert (forward+backward) over the time,\n"
              "so rows with capacity drops or zero-computation experts show the saving as a higher rate.\n"
              "hot: share of slots on the first N/8 experts; zc: share of slots on zero-computation experts.\n");
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << out.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "bench_moe_layer: cannot write %s\n", json_path.c_str());
      return 2;
    }
  }
  return 0;
}
