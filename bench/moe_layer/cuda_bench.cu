// bench_moe_layer --backend cuda: the GPU rows (DESIGN §10, issue 4). For each shape, bf16 (or fp32)
// SwiGLU with softmax top-k, uniform and skewed routing:
//   ms per forward and per forward+backward (cudaEvent, median of --reps after a warm-up, two input
//   sets alternated), TFLOP/s (6·T·k·d·d_expert and 18·T·k·d·d_expert), the same FLOPs through one dense
//   cuBLAS GEMM ([T·k, d] x [d, 3·d_expert]) as the ceiling, and the ratio;
//   GB/s of the permutation (sort + row gather) and of the combine, against a device-to-device copy;
//   MoE++ rows (N FFN + zero/copy/constant at tau 1.0, 0.75, 0.1, gamma 1) against the vanilla layer
//   of the same FFN experts (whole-layer forward+backward time; the speed-up column).
// --gemm all times every expert-GEMM strategy (grouped, streams, lt) and marks the fastest per shape.
// --json: the file is rewritten whole (valid JSON, "complete": false until the end) after every row, so a
// run killed at a time cap still leaves the rows it measured.
// --max-gib G / free device memory: a shape whose estimated device memory (estimate_bytes) exceeds G GiB
// or the GPU's free memory is skipped, and listed under "skipped" with the reason.
// --time-budget S: no row starts after S seconds, or when the previous row's time (scaled by FLOPs) would
// carry it past S; the rows left are listed under "skipped". The run still exits 0 and writes its JSON.
// Exit code 77 when there is no CUDA device (ctest: skipped); 1 instead when MOEKIT_REQUIRE_GPU=1.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <moekit/backend/cuda/moe_layer.cuh>
#include <moekit/layer/any_layer.hpp>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "cuda_bench.hpp"
#include "routing_shares.hpp"

namespace {

namespace mc = moekit::backend::cuda;
using namespace moekit;

struct Shape {
  const char* name;
  std::int64_t tokens, d, f, experts, k;
};
const Shape kShapes[] = {{"mixtral", 16384, 4096, 14336, 8, 2},
                         {"olmoe", 32768, 2048, 1024, 64, 8},
                         {"qwen3-30b-a3b", 32768, 2048, 768, 128, 8},
                         {"deepseek-v3-routed", 8192, 7168, 2048, 256, 8}};
const Shape kQuick[] = {{"quick", 512, 256, 384, 8, 2}};

// Deterministic pseudo-random fill on the device (bench data only): uniform in [-bound, bound).
template <class S>
__global__ void fill_uniform_kernel(S* p, std::size_t n, float bound, unsigned long long seed) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    unsigned long long z = (i + 1) * 0x9e3779b97f4a7c15ull + seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = float(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    mc::store_f32(p, i, bound * (2.f * u - 1.f));
  }
}
template <class S>
void fill_uniform(S* p, std::size_t n, float bound, unsigned long long seed) {
  if (n == 0) return;
  fill_uniform_kernel<<<4096, 256>>>(p, n, bound, seed);
  MOEKIT_CUDA_CHECK(cudaGetLastError());
}
// Column 0 of a row-major [rows, cols] matrix (the "skewed" routing feature).
template <class S>
__global__ void set_column0_kernel(S* p, std::int64_t rows, std::int64_t cols, float v) {
  const std::int64_t r = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) mc::store_f32(p, std::size_t(r * cols), v);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Median ms of fn() over reps, after one warm-up, timed with events on the default stream.
double time_ms(const std::function<void()>& fn, int reps) {
  fn();
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  MOEKIT_CUDA_CHECK(cudaEventCreate(&a));
  MOEKIT_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    MOEKIT_CUDA_CHECK(cudaEventRecord(a));
    fn();
    MOEKIT_CUDA_CHECK(cudaEventRecord(b));
    MOEKIT_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    MOEKIT_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return median(ms);
}

struct Options {
  bool quick = false, bf16 = true;
  int reps = 10;
  double max_gib = 0, time_budget_s = 0;  // 0: no limit
  std::string json, gemm = "auto";
  std::vector<std::string> only;
};

// Device memory the rows of one shape need at most, in bytes (an upper estimate, from the layer's
// parameter store and its workspace, layer_ops.cuh carve(), at T tokens): parameters in the storage type,
// fp32 gradients, the workspace (x; fp32 logits, probabilities, their gradients and scratch per token and
// expert; per routed row x, [h1|h3], a, y and dy), the bench's x0, x1, y, dy, dx, and 512 MiB for cuBLAS
// and the allocator's rounding; or the dense ceiling's three matrices if that is more.
std::size_t estimate_bytes(const Shape& s, std::size_t storage) {
  const double T = double(s.tokens), d = double(s.d), f = double(s.f), E = double(s.experts), rows = T * double(s.k),
               S = double(storage), N = 2 * E;  // N: room for MoE++'s zero/copy/constant experts in the router
  const double weights = E * 3 * d * f + N * d;
  const double params = weights * S + N * d * 4, grads = weights * 4;
  const double workspace = T * d * (S + 4) + 5 * T * N * 4 + rows * 48 + rows * (3 * d + 3 * f) * S;
  const double bench = 5 * T * d * S;
  const double ceiling = (rows * d + d * 3 * f + rows * 3 * f) * S;
  return std::size_t(std::max(params + grads + workspace + bench, ceiling)) + (std::size_t(512) << 20);
}

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// The JSON file, rewritten whole after each row (to a temporary file, then renamed over the old one).
void write_json(const nlohmann::ordered_json& out, const std::string& path) {
  if (path.empty()) return;
  const std::string tmp = path + ".part";
  {
    std::ofstream f(tmp);
    f << out.dump(2) << "\n";
    if (!f) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + path);
}

template <class S>
struct Ceiling {
  double tflops = 0;
};

// One dense GEMM with the forward's FLOPs: [T·k, d] x [d, 3·d_expert], the storage type, fp32 compute.
template <class S>
double dense_ceiling_tflops(const Shape& s, int reps) {
  const std::int64_t m = s.tokens * s.k, n = 3 * s.f, k = s.d;
  mc::DeviceArray<S> a(std::size_t(m * k)), b(std::size_t(k * n)), c(std::size_t(m * n));
  fill_uniform(a.data(), a.size(), 1.f, 1), fill_uniform(b.data(), b.size(), 0.02f, 2);
  cublasHandle_t h;
  MOEKIT_CUBLAS_CHECK(cublasCreate(&h));
  const cudaDataType_t t = mc::data_type<S>();
  const double ms = time_ms([&] {
    MOEKIT_CUBLAS_CHECK(mc::gemm_row_major(h, {false, false, t, t, 1.f, 0.f},
                                           {int(m), int(n), int(k), a.data(), int(k), b.data(), int(n), c.data(), int(n)}));
  }, reps);
  cublasDestroy(h);
  return 2.0 * double(m) * double(n) * double(k) / (ms * 1e9);
}

// Device-to-device copy bandwidth (bytes read + bytes written) of a 1 GiB buffer (64 MiB with --quick).
double copy_gbps(bool quick, int reps) {
  const std::size_t bytes = quick ? (std::size_t(64) << 20) : (std::size_t(1) << 30);
  mc::DeviceArray<char> a(bytes), b(bytes);
  MOEKIT_CUDA_CHECK(cudaMemset(a.data(), 1, bytes));
  const double ms = time_ms([&] { MOEKIT_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice)); }, reps);
  return 2.0 * double(bytes) / (ms * 1e6);
}

struct KernelRates {
  double permute_ms = 0, permute_gbps = 0, combine_ms = 0, combine_gbps = 0;
};

// The permutation (radix sorts + row gather) and the combine alone, on uniform random expert ids.
// Bytes: the gather reads and writes T·k rows of d; the combine reads T·k rows and writes T rows.
template <class S>
KernelRates permute_combine_rates(const Shape& s, int reps) {
  const int T = int(s.tokens), K = int(s.k), D = int(s.d), N = int(s.experts), R = T * K;
  std::mt19937 g(5);
  std::vector<int> idx(static_cast<std::size_t>(R));
  for (int t = 0; t < T; ++t) {  // k distinct experts per token
    std::vector<int> pick(static_cast<std::size_t>(N));
    for (int e = 0; e < N; ++e) pick[e] = e;
    for (int j = 0; j < K; ++j) {
      std::swap(pick[j], pick[j + int(g() % unsigned(N - j))]);
      idx[std::size_t(t) * K + j] = pick[j];
    }
  }
  mc::DeviceArray<int> didx(R), slot_of_row(R), row_of_slot(R), offsets(N + 1);
  mc::DeviceArray<S> x(std::size_t(T) * D), xp(std::size_t(R) * D), out(std::size_t(T) * D);
  mc::DeviceArray<float> gate(R);
  MOEKIT_CUDA_CHECK(cudaMemcpy(didx.data(), idx.data(), sizeof(int) * idx.size(), cudaMemcpyHostToDevice));
  fill_uniform(x.data(), x.size(), 1.f, 3), fill_uniform(gate.data(), gate.size(), 1.f, 4);
  mc::PermuteParams p;
  p.idx = didx.data(), p.slots = moekit::SlotLayout::token_choice(T, K), p.experts = N;
  p.slot_of_row = slot_of_row.data(), p.row_of_slot = row_of_slot.data(), p.offsets = offsets.data();
  std::size_t bytes = 0;
  MOEKIT_CUDA_CHECK(mc::permute_slots(nullptr, bytes, p, nullptr));
  mc::DeviceArray<char> temp(bytes);
  KernelRates r;
  r.permute_ms = time_ms([&] {
    MOEKIT_CUDA_CHECK(mc::permute_slots(temp.data(), bytes, p, nullptr));
    MOEKIT_CUDA_CHECK(mc::gather_rows(x.data(), slot_of_row.data(), xp.data(), R, K, D, nullptr));
  }, reps);
  r.combine_ms = time_ms([&] { MOEKIT_CUDA_CHECK(mc::combine(xp.data(), gate.data(), row_of_slot.data(), out.data(), T, K, D, nullptr)); },
                         reps);
  const double row_bytes = double(D) * sizeof(S);
  r.permute_gbps = 2.0 * double(R) * row_bytes / (r.permute_ms * 1e6);
  r.combine_gbps = (double(R) + double(T)) * row_bytes / (r.combine_ms * 1e6);
  return r;
}

struct Row {
  std::string shape, routing, experts, gemm, error;
  double tau = 1, gamma = 0, fwd_ms = 0, fb_ms = 0, ceiling = 0, hot = 0, zc = 0, flops_fwd = 0;
  std::int64_t expert_flops = 0, ffn_rows = 0;
  int fallbacks = 0;
  GemmStats paths;  // the phases by path (grouped, by_type, by_alignment, refused, lt_no_algo)
};

// What did not run as the strategy says, for the table: bf16 weight gradients go to the streams path by
// type under "grouped" by design (not noted); alignment, refusals and Lt shapes without an algorithm are.
inline std::string path_note(const GemmStats& p) {
  std::string s;
  if (p.by_alignment) s += " by-alignment " + std::to_string(p.by_alignment);
  if (p.refused) s += " REFUSED " + std::to_string(p.refused);
  if (p.lt_no_algo) s += " lt-no-algo " + std::to_string(p.lt_no_algo);
  return s.empty() ? s : " (" + s.substr(1) + ")";
}

// Each layer runs through the erased interface (layer/any_layer.hpp), as the harness and the examples
// do; erase<Layer> instantiates only the two layer types measured here (make_moe_layer would compile
// every policy combination into this translation unit).
template <class Layer>
Row run_layer(const Shape& s, const MoeConfig& cfg, bool skewed, mc::GemmStrategy gemm, int reps, const char* experts_name) {
  using S = typename Layer::storage_type;
  Row r;
  r.shape = s.name, r.routing = skewed ? "skewed" : "uniform", r.experts = experts_name, r.tau = cfg.tau;
  r.gamma = cfg.capacity_factor;
  r.flops_fwd = 6.0 * double(s.tokens) * double(s.k) * double(s.d) * double(s.f);
  try {
    const auto erased = erase<Layer>(cfg, gemm);
    AnyMoeLayer<typename Layer::backend_type>& layer = *erased;
    r.gemm = layer.gemm_stats().strategy;
    // torch.nn.Linear-like bounds, filled on the device (the host init of 10^10 values would take minutes).
    unsigned long long seed = 11;
    for (auto& p : layer.parameters()) {
      const double fan_in = double(p.shape.back());
      const float bound = float(1.0 / std::sqrt(fan_in));
      if (p.dtype == CUDA_R_32F) fill_uniform(static_cast<float*>(p.value), std::size_t(p.numel()), bound, ++seed);
      else fill_uniform(static_cast<S*>(p.value), std::size_t(p.numel()), bound, ++seed);
    }
    const std::int64_t T = s.tokens, D = s.d;
    if (skewed) {  // x[:, 0] = 1 and the first N/8 experts' router weight on it = 3/k: about half the slots
      const std::int64_t hot = std::max<std::int64_t>(1, s.experts / 8);
      const float bias = 3.0f / float(s.k);
      set_column0_kernel<<<unsigned((hot + 255) / 256), 256>>>(static_cast<S*>(layer.parameters()[0].value), hot, D, bias);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
    layer.reserve(T);
    mc::DeviceArray<S> x0(std::size_t(T * D)), x1(std::size_t(T * D)), y(std::size_t(T * D)), dy(std::size_t(T * D)),
        dx(std::size_t(T * D));
    fill_uniform(x0.data(), x0.size(), 1.f, 101), fill_uniform(x1.data(), x1.size(), 1.f, 102);
    fill_uniform(dy.data(), dy.size(), 1.f, 103);
    if (skewed)
      for (auto* xb : {&x0, &x1}) {
        set_column0_kernel<<<unsigned((T + 255) / 256), 256>>>(xb->data(), T, D, 1.f);
        MOEKIT_CUDA_CHECK(cudaGetLastError());
      }
    int which = 0;
    auto fwd = [&] {
      layer.forward(MatrixView<const S>((which ? x1 : x0).data(), {T, D}), MatrixView<S>(y.data(), {T, D}));
      which ^= 1;
    };
    r.fwd_ms = time_ms(fwd, reps);
    r.fb_ms = time_ms([&] {
      fwd();
      layer.backward(MatrixView<const S>(dy.data(), {T, D}), MatrixView<S>(dx.data(), {T, D}));
    }, reps);
    r.expert_flops = layer.expert_gemm_flops();
    r.ffn_rows = layer.ffn_rows();
    r.paths = layer.gemm_stats();
    r.fallbacks = r.paths.fallbacks;
    const RoutingShares shares = routing_shares(layer.routed_counts(), cfg.num_ffn_experts);
    r.hot = shares.hot, r.zc = shares.zc;
  } catch (const std::exception& e) {  // e.g. out of memory on the largest shapes: say so in the row
    r.error = e.what();
    cudaGetLastError();
  }
  return r;
}

MoeConfig base_config(const Shape& s) {
  MoeConfig c;
  c.d_model = s.d, c.d_expert = s.f, c.num_ffn_experts = s.experts, c.top_k = s.k, c.lbl_coef = 0.01;
  return c;
}

template <class V>
int run(const Options& o, const std::string& command) {
  using S = mc::storage_t<V>;
  using Soft = router::TopK<router::Softmax>;
  using Vanilla = MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::SwiGLU>>;
  using MoePP = MoeLayer<backend::Cuda<V>, Soft, experts::Set<experts::Ffn<act::SwiGLU>, experts::Zero, experts::Copy, experts::Constant>>;
  cudaDeviceProp prop{};
  MOEKIT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  const int reps = o.quick ? 2 : o.reps;
  const auto t_start = std::chrono::steady_clock::now();
  auto elapsed_s = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count(); };
  std::printf("bench_moe_layer: backend cuda %s SwiGLU | %s (%.1f GiB) | CUDA runtime %d | reps %d | gemm %s", std::is_same_v<V, float> ? "fp32" : "bf16",
              prop.name, double(prop.totalGlobalMem) / kGiB, runtime, reps, o.gemm.c_str());
  if (o.max_gib > 0) std::printf(" | max %.1f GiB", o.max_gib);
  if (o.time_budget_s > 0) std::printf(" | time budget %.0f s", o.time_budget_s);
  std::printf("\n");
  std::fflush(stdout);
  const double copy = copy_gbps(o.quick, reps);
  std::vector<mc::GemmStrategy> strategies;
  if (o.gemm == "all") strategies = {mc::GemmStrategy::kGrouped, mc::GemmStrategy::kStreams, mc::GemmStrategy::kLt};
  else strategies = {mc::parse_gemm_strategy(o.gemm)};

  nlohmann::ordered_json out;
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  out["date"] = date, out["device"] = prop.name, out["cuda_runtime"] = runtime, out["command"] = command;
  out["dtype"] = std::is_same_v<V, float> ? "fp32" : "bf16";
  out["device_memory_gib"] = double(prop.totalGlobalMem) / kGiB;
  out["max_gib"] = o.max_gib, out["time_budget_s"] = o.time_budget_s;
  out["complete"] = false;  // true once the last row is written
  out["copy_gbps"] = copy;
  out["rows"] = nlohmann::json::array();
  out["kernels"] = nlohmann::json::array();
  out["skipped"] = nlohmann::json::array();  // {shape, what, reason}: shapes over the memory limit, rows past the time budget
  write_json(out, o.json);

  std::printf("\ndevice-to-device copy: %.0f GB/s (read + write)\n", copy);
  std::printf("\n%-19s %-8s %-14s %5s %5s %-8s | %8s %7s %5s | %8s %7s %5s | %7s %5s %5s\n", "shape", "routing", "experts", "gamma",
              "tau", "gemm", "fwd ms", "TFLOP/s", "ratio", "f+b ms", "TFLOP/s", "ratio", "dense", "hot", "zc");
  const auto* begin = o.quick ? std::begin(kQuick) : std::begin(kShapes);
  const auto* end = o.quick ? std::end(kQuick) : std::end(kShapes);
  auto emit = [&](const Row& r) {
    const double tf = r.flops_fwd / (r.fwd_ms * 1e9), tfb = 3 * r.flops_fwd / (r.fb_ms * 1e9);
    if (!r.error.empty()) {
      std::printf("%-19s %-8s %-14s %5.2f %5.2f %-8s | failed: %s\n", r.shape.c_str(), r.routing.c_str(), r.experts.c_str(),
                  r.gamma, r.tau, r.gemm.c_str(), r.error.c_str());
    } else {
      std::printf("%-19s %-8s %-14s %5.2f %5.2f %-8s | %8.3f %7.1f %5.2f | %8.3f %7.1f %5.2f | %7.1f %5.2f %5.2f%s\n",
                  r.shape.c_str(), r.routing.c_str(), r.experts.c_str(), r.gamma, r.tau, r.gemm.c_str(), r.fwd_ms, tf,
                  tf / r.ceiling, r.fb_ms, tfb, tfb / r.ceiling, r.ceiling, r.hot, r.zc, path_note(r.paths).c_str());
    }
    out["rows"].push_back({{"shape", r.shape}, {"routing", r.routing}, {"experts", r.experts}, {"gemm", r.gemm},
                           {"capacity_factor", r.gamma}, {"tau", r.tau}, {"fwd_ms", r.fwd_ms}, {"fwd_tflops", tf},
                           {"fwd_ratio", tf / r.ceiling}, {"fwd_bwd_ms", r.fb_ms}, {"fwd_bwd_tflops", tfb},
                           {"fwd_bwd_ratio", tfb / r.ceiling}, {"dense_gemm_tflops", r.ceiling}, {"hot_expert_share", r.hot},
                           {"zc_slot_share", r.zc}, {"expert_gemm_flops", r.expert_flops}, {"ffn_rows", r.ffn_rows},
                           {"grouped_fallbacks", r.fallbacks},
                           {"gemm_paths", {{"grouped", r.paths.grouped}, {"by_type", r.paths.by_type},
                                           {"by_alignment", r.paths.by_alignment}, {"refused", r.paths.refused},
                                           {"lt_no_algo", r.paths.lt_no_algo}}},
                           {"error", r.error}});
    write_json(out, o.json);
    std::fflush(stdout);
  };
  auto skip = [&](const Shape& s, const std::string& what, const std::string& reason) {
    std::printf("%-19s %s skipped: %s\n", s.name, what.c_str(), reason.c_str());
    out["skipped"].push_back({{"shape", s.name}, {"what", what}, {"reason", reason}});
    write_json(out, o.json);
    std::fflush(stdout);
  };
  // --time-budget: a row starts only if the budget is not spent and the last row's time, scaled by the
  // FLOPs of the new shape, still fits in it.
  double last_row_s = 0, last_row_flops = 0;
  auto fits_budget = [&](const Shape& s, std::string& reason) {
    if (o.time_budget_s <= 0) return true;
    const double now = elapsed_s(), flops = 6.0 * double(s.tokens) * double(s.k) * double(s.d) * double(s.f);
    const double predicted = last_row_flops > 0 ? last_row_s * flops / last_row_flops : 0;
    if (now + predicted <= o.time_budget_s) return true;
    char buf[160];
    std::snprintf(buf, sizeof buf, "time budget: %.0f s of %.0f spent, a row is predicted to take %.0f s", now, o.time_budget_s, predicted);
    reason = buf;
    return false;
  };
  // A timed row, unless the time budget says no; returns false when skipped.
  auto timed_row = [&](const Shape& s, const std::string& what, const std::function<void()>& row) {
    std::string reason;
    if (!fits_budget(s, reason)) {
      skip(s, what, reason);
      return false;
    }
    const double t0 = elapsed_s();
    row();
    last_row_s = elapsed_s() - t0;
    last_row_flops = 6.0 * double(s.tokens) * double(s.k) * double(s.d) * double(s.f);
    return true;
  };
  for (const Shape* s = begin; s != end; ++s) {
    if (!o.only.empty() && std::find(o.only.begin(), o.only.end(), s->name) == o.only.end()) continue;
    {  // memory: the estimate against --max-gib and the free device memory now (earlier shapes' buffers are freed)
      std::size_t free_b = 0, total_b = 0;
      MOEKIT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
      const double need = double(estimate_bytes(*s, sizeof(S))) / kGiB, free_gib = double(free_b) / kGiB;
      char buf[200];
      if (o.max_gib > 0 && need > o.max_gib) {
        std::snprintf(buf, sizeof buf, "needs about %.1f GiB of device memory, over --max-gib %.1f", need, o.max_gib);
        skip(*s, "shape", buf);
        continue;
      }
      if (need > free_gib) {
        std::snprintf(buf, sizeof buf, "needs about %.1f GiB of device memory, %.1f GiB free", need, free_gib);
        skip(*s, "shape", buf);
        continue;
      }
      std::printf("%-19s estimated device memory %.1f GiB (%.1f GiB free)\n", s->name, need, free_gib);
    }
    std::string reason;
    if (!fits_budget(*s, reason)) {
      skip(*s, "shape", reason);
      continue;
    }
    double ceiling = 0;
    try {
      ceiling = dense_ceiling_tflops<S>(*s, reps);
    } catch (const std::exception& e) {
      std::printf("%s: dense ceiling failed: %s\n", s->name, e.what());
      cudaGetLastError();
    }
    for (bool skewed : {false, true})
      for (auto g : strategies)
        timed_row(*s, std::string(skewed ? "skewed" : "uniform") + " " + mc::to_string(g), [&] {
          Row r = run_layer<Vanilla>(*s, base_config(*s), skewed, g, reps, "ffn");
          r.ceiling = ceiling;
          emit(r);
        });
    if (!fits_budget(*s, reason)) {
      skip(*s, "permute/combine rates", reason);
    } else try {
      const KernelRates k = permute_combine_rates<S>(*s, reps);
      std::printf("%-19s permute (sort + gather) %.3f ms = %.0f GB/s (%.2f of copy); combine %.3f ms = %.0f GB/s (%.2f of copy)\n",
                  s->name, k.permute_ms, k.permute_gbps, k.permute_gbps / copy, k.combine_ms, k.combine_gbps, k.combine_gbps / copy);
      out["kernels"].push_back({{"shape", s->name}, {"permute_ms", k.permute_ms}, {"permute_gbps", k.permute_gbps},
                                {"permute_ratio_to_copy", k.permute_gbps / copy}, {"combine_ms", k.combine_ms},
                                {"combine_gbps", k.combine_gbps}, {"combine_ratio_to_copy", k.combine_gbps / copy}});
      write_json(out, o.json);
    } catch (const std::exception& e) {
      std::printf("%s: permute/combine timing failed: %s\n", s->name, e.what());
    }
    // MoE++ rows on olmoe (and the quick shape): N FFN + N/8 zero + N/8 copy + N/4 constant, gamma 1,
    // against the vanilla layer of the same FFN experts at gamma 1.
    if (std::string(s->name) != "olmoe" && !o.quick) continue;
    MoeConfig v = base_config(*s);
    v.capacity_factor = 1.0;
    Row van;
    if (!timed_row(*s, "MoE++ vanilla gamma 1", [&] {
          van = run_layer<Vanilla>(*s, v, false, strategies.front(), reps, "ffn");
          van.ceiling = ceiling;
          emit(van);
        }))
      continue;
    for (double tau : {1.0, 0.75, 0.1}) {
      MoeConfig c = v;
      c.num_zero_experts = std::max<std::int64_t>(1, s->experts / 8), c.num_copy_experts = c.num_zero_experts;
      c.num_constant_experts = 2 * c.num_zero_experts, c.tau = tau;
      char what[48];
      std::snprintf(what, sizeof what, "MoE++ tau %.2f", tau);
      timed_row(*s, what, [&] {
        Row r = run_layer<MoePP>(*s, c, false, strategies.front(), reps, "ffn+zc(8:1:1:2)");
        r.ceiling = ceiling;
        emit(r);
        if (r.error.empty() && van.error.empty()) {
          std::printf("%-19s MoE++ tau %.2f: forward+backward speed-up over vanilla %.2fx\n", s->name, tau, van.fb_ms / r.fb_ms);
          out["rows"].back()["speedup_over_vanilla_fwd_bwd"] = van.fb_ms / r.fb_ms;
          write_json(out, o.json);
        }
      });
    }
  }
  std::printf("\nTFLOP/s are nominal (6·T·k·d·d_expert forward, 18·T·k·d·d_expert forward+backward over the time);\n"
              "dense: one cuBLAS GEMM [T·k, d] x [d, 3·d_expert] in the same dtype; ratio = TFLOP/s / dense.\n");
  if (!out["skipped"].empty())
    std::printf("skipped: %zu shape(s) or row(s), listed above and under \"skipped\" in the JSON\n", out["skipped"].size());
  out["complete"] = true;
  out["seconds"] = elapsed_s();
  write_json(out, o.json);
  return 0;
}

}  // namespace

int run_cuda_bench(int argc, char** argv) {
  Options o;
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--backend") next();
    else if (a == "--quick") o.quick = true;
    else if (a == "--reps") o.reps = std::max(1, std::atoi(next().c_str()));
    else if (a == "--json") o.json = next();
    else if (a == "--gemm") o.gemm = next();
    else if (a == "--dtype") {
      const std::string d = next();
      if (d != "bf16" && d != "fp32") throw std::runtime_error("--dtype must be bf16 or fp32, not " + d);
      o.bf16 = d == "bf16";
    } else if (a == "--shape") o.only.push_back(next());
    else if (a == "--max-gib") o.max_gib = std::atof(next().c_str());
    else if (a == "--time-budget") o.time_budget_s = std::atof(next().c_str());
    else throw std::runtime_error("unknown argument " + a);
  }
  if (o.gemm != "all") mc::parse_gemm_strategy(o.gemm);  // a clear error before any device work
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    const char* require = std::getenv("MOEKIT_REQUIRE_GPU");
    if (require && *require && std::string(require) != "0") {  // run on a lent GPU: no device is a failure
      std::printf("bench_moe_layer: no CUDA device (%s), and MOEKIT_REQUIRE_GPU=%s demands one\n",
                  e != cudaSuccess ? cudaGetErrorString(e) : "0 devices", require);
      return 1;
    }
    std::printf("bench_moe_layer: no CUDA device (%s); skipping\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return kNoCudaDevice;
  }
  return o.bf16 ? run<moekit::bf16>(o, command) : run<float>(o, command);
}
