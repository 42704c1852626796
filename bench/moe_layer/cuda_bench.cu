// bench_moe_layer --backend cuda: the GPU rows (DESIGN §10, issue 4). For each shape, bf16 (or fp32)
// SwiGLU with softmax top-k, uniform and skewed routing:
//   ms per forward and per forward+backward (cudaEvent, median of --reps after a warm-up, two input
//   sets alternated), TFLOP/s (6·T·k·d·d_expert and 18·T·k·d·d_expert), the same FLOPs through one dense
//   cuBLAS GEMM ([T·k, d] x [d, 3·d_expert]) as the ceiling, and the ratio;
//   GB/s of the permutation (sort + row gather) and of the combine, against a device-to-device copy;
//   MoE++ rows (N FFN + zero/copy/constant at tau 1.0, 0.75, 0.1, gamma 1) against the vanilla layer
//   of the same FFN experts (whole-layer forward+backward time; the speed-up column).
// --gemm all times every expert-GEMM strategy (grouped, streams, lt) and marks the fastest per shape.
// Exit code 77 when there is no CUDA device (ctest: skipped).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
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
  std::string json, gemm = "auto";
  std::vector<std::string> only;
};

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
};

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
    r.fallbacks = layer.gemm_stats().fallbacks;
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
  std::printf("bench_moe_layer: backend cuda %s SwiGLU | %s | CUDA runtime %d | reps %d | gemm %s\n",
              std::is_same_v<V, float> ? "fp32" : "bf16", prop.name, runtime, reps, o.gemm.c_str());
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
  out["copy_gbps"] = copy;
  out["rows"] = nlohmann::json::array();
  out["kernels"] = nlohmann::json::array();

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
                  tf / r.ceiling, r.fb_ms, tfb, tfb / r.ceiling, r.ceiling, r.hot, r.zc, r.fallbacks ? " (grouped fell back)" : "");
    }
    out["rows"].push_back({{"shape", r.shape}, {"routing", r.routing}, {"experts", r.experts}, {"gemm", r.gemm},
                           {"capacity_factor", r.gamma}, {"tau", r.tau}, {"fwd_ms", r.fwd_ms}, {"fwd_tflops", tf},
                           {"fwd_ratio", tf / r.ceiling}, {"fwd_bwd_ms", r.fb_ms}, {"fwd_bwd_tflops", tfb},
                           {"fwd_bwd_ratio", tfb / r.ceiling}, {"dense_gemm_tflops", r.ceiling}, {"hot_expert_share", r.hot},
                           {"zc_slot_share", r.zc}, {"expert_gemm_flops", r.expert_flops}, {"ffn_rows", r.ffn_rows},
                           {"grouped_fallbacks", r.fallbacks}, {"error", r.error}});
  };
  for (const Shape* s = begin; s != end; ++s) {
    if (!o.only.empty() && std::find(o.only.begin(), o.only.end(), s->name) == o.only.end()) continue;
    double ceiling = 0;
    try {
      ceiling = dense_ceiling_tflops<S>(*s, reps);
    } catch (const std::exception& e) {
      std::printf("%s: dense ceiling failed: %s\n", s->name, e.what());
      cudaGetLastError();
    }
    for (bool skewed : {false, true})
      for (auto g : strategies) {
        Row r = run_layer<Vanilla>(*s, base_config(*s), skewed, g, reps, "ffn");
        r.ceiling = ceiling;
        emit(r);
      }
    try {
      const KernelRates k = permute_combine_rates<S>(*s, reps);
      std::printf("%-19s permute (sort + gather) %.3f ms = %.0f GB/s (%.2f of copy); combine %.3f ms = %.0f GB/s (%.2f of copy)\n",
                  s->name, k.permute_ms, k.permute_gbps, k.permute_gbps / copy, k.combine_ms, k.combine_gbps, k.combine_gbps / copy);
      out["kernels"].push_back({{"shape", s->name}, {"permute_ms", k.permute_ms}, {"permute_gbps", k.permute_gbps},
                                {"permute_ratio_to_copy", k.permute_gbps / copy}, {"combine_ms", k.combine_ms},
                                {"combine_gbps", k.combine_gbps}, {"combine_ratio_to_copy", k.combine_gbps / copy}});
    } catch (const std::exception& e) {
      std::printf("%s: permute/combine timing failed: %s\n", s->name, e.what());
    }
    // MoE++ rows on olmoe (and the quick shape): N FFN + N/8 zero + N/8 copy + N/4 constant, gamma 1,
    // against the vanilla layer of the same FFN experts at gamma 1.
    if (std::string(s->name) != "olmoe" && !o.quick) continue;
    MoeConfig v = base_config(*s);
    v.capacity_factor = 1.0;
    Row van = run_layer<Vanilla>(*s, v, false, strategies.front(), reps, "ffn");
    van.ceiling = ceiling;
    emit(van);
    for (double tau : {1.0, 0.75, 0.1}) {
      MoeConfig c = v;
      c.num_zero_experts = std::max<std::int64_t>(1, s->experts / 8), c.num_copy_experts = c.num_zero_experts;
      c.num_constant_experts = 2 * c.num_zero_experts, c.tau = tau;
      Row r = run_layer<MoePP>(*s, c, false, strategies.front(), reps, "ffn+zc(8:1:1:2)");
      r.ceiling = ceiling;
      emit(r);
      if (r.error.empty() && van.error.empty()) {
        std::printf("%-19s MoE++ tau %.2f: forward+backward speed-up over vanilla %.2fx\n", s->name, tau, van.fb_ms / r.fb_ms);
        out["rows"].back()["speedup_over_vanilla_fwd_bwd"] = van.fb_ms / r.fb_ms;
      }
    }
  }
  std::printf("\nTFLOP/s are nominal (6·T·k·d·d_expert forward, 18·T·k·d·d_expert forward+backward over the time);\n"
              "dense: one cuBLAS GEMM [T·k, d] x [d, 3·d_expert] in the same dtype; ratio = TFLOP/s / dense.\n");
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << out.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "bench_moe_layer: cannot write %s\n", o.json.c_str());
      return 2;
    }
  }
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
    else throw std::runtime_error("unknown argument " + a);
  }
  if (o.gemm != "all") mc::parse_gemm_strategy(o.gemm);  // a clear error before any device work
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("bench_moe_layer: no CUDA device (%s); skipping\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return kNoCudaDevice;
  }
  return o.bf16 ? run<moekit::bf16>(o, command) : run<float>(o, command);
}
