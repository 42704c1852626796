// bench_gemm_libraries: one GEMM C[M,N] = A[M,K] B[K,N] (row-major; default the 4096 x 512 x
// 3072) with each CPU GEMM library this machine has, on the same threads, alternated over rounds:
//   OpenBLAS with each x86-64 kernel it ships that the CPU can run (re-selected in this process, as
//   moekit's gemm_library() does), and its own pick;
//   BLIS's CBLAS (dlopen libblis.so.4, Debian libblis4), which selects its kernel by CPU features;
//   oneDNN's dnnl_sgemm and dnnl_gemm_bf16bf16f32 (dlopen libdnnl.so.2, Debian libdnnl2).
// A library that is not installed gets a row that says so. Prints a table (GFLOP/s, median of the
// rounds, and the ratio to OpenBLAS's own pick) and writes JSON (--json).
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <moekit/backend/host/blas.hpp>
#include <moekit/core/bf16.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

extern "C" void openblas_set_num_threads(int) __attribute__((weak));

namespace {
using moekit::backend::host::CpuFeatures;
using moekit::backend::host::openblas_core_level;
namespace detail = moekit::backend::host::detail;

using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
using DnnlSgemm = int (*)(char, char, std::int64_t, std::int64_t, std::int64_t, float, const float*, std::int64_t, const float*,
                          std::int64_t, float, float*, std::int64_t);
using DnnlBf16 = int (*)(char, char, std::int64_t, std::int64_t, std::int64_t, float, const std::uint16_t*, std::int64_t,
                         const std::uint16_t*, std::int64_t, float, float*, std::int64_t);

struct Variant {
  std::string name, dtype = "fp32", note;
  std::function<void()> prepare;  // before each timing (the OpenBLAS kernel switch)
  std::function<void()> run;
  std::vector<double> gflops;
  std::vector<float> out;  // C of the first run, for the agreement check
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string loadavg() {
  std::ifstream la("/proc/loadavg");
  std::string a, b, c;
  la >> a >> b >> c;
  return a + " " + b + " " + c;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t M = 4096, N = 3072, K = 512;
  int rounds = 5, reps = 3;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_gemm_libraries: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--m") M = std::stoll(next());
    else if (a == "--n") N = std::stoll(next());
    else if (a == "--k") K = std::stoll(next());
    else if (a == "--rounds") rounds = std::stoi(next());
    else if (a == "--reps") reps = std::stoi(next());
    else if (a == "--json") json = next();
    else {
      std::fprintf(stderr, "usage: bench_gemm_libraries [--m M --n N --k K] [--rounds R] [--reps N] [--json out.json]\n");
      return 2;
    }
  }
  const int threads = omp_get_max_threads();
  if (openblas_set_num_threads) openblas_set_num_threads(threads);
  const CpuFeatures cpu = CpuFeatures::detect();
  const std::string own_pick = openblas_get_corename ? openblas_get_corename() : "";  // before gemm_library() changes it
  std::printf("bench_gemm_libraries: C[%lld,%lld] = A[%lld,%lld] B[%lld,%lld] | %d threads | CPU %s | OpenBLAS's own pick %s | load %s\n",
              (long long)M, (long long)N, (long long)M, (long long)K, (long long)K, (long long)N, threads, cpu.describe().c_str(),
              own_pick.empty() ? "(not OpenBLAS)" : own_pick.c_str(), loadavg().c_str());

  std::vector<float> A(std::size_t(M * K)), B(std::size_t(K * N)), C(std::size_t(M * N));
  for (std::size_t i = 0; i < A.size(); ++i) A[i] = float(std::sin(0.001 * double(i)));
  for (std::size_t i = 0; i < B.size(); ++i) B[i] = float(std::cos(0.0013 * double(i)));
  std::vector<std::uint16_t> Ab(A.size()), Bb(B.size());
  for (std::size_t i = 0; i < A.size(); ++i) Ab[i] = moekit::bf16::from_float(A[i]);
  for (std::size_t i = 0; i < B.size(); ++i) Bb[i] = moekit::bf16::from_float(B[i]);

  std::vector<Variant> vs;
  auto cblas_run = [&](Sgemm f) {
    return [&, f] { f(101, 111, 111, int(M), int(N), int(K), 1.f, A.data(), int(K), B.data(), int(N), 0.f, C.data(), int(N)); };
  };
  if (openblas_get_corename) {
    std::vector<std::string> cores = {own_pick};
    for (const char* c : {"Prescott", "Sandybridge", "Haswell", "Zen", "SkylakeX", "Cooperlake"})
      if (openblas_core_level(c) <= cpu.level() && c != own_pick) cores.push_back(c);
    for (const std::string& c : cores) {
      Variant v;
      v.name = "OpenBLAS " + c + (c == own_pick ? " (its own pick)" : "");
      v.prepare = [c] { detail::select_openblas_core(c); };
      v.run = cblas_run(reinterpret_cast<Sgemm>(&cblas_sgemm));
      vs.push_back(std::move(v));
    }
  } else {
    Variant v;
    v.name = "linked CBLAS";
    v.run = cblas_run(reinterpret_cast<Sgemm>(&cblas_sgemm));
    vs.push_back(std::move(v));
  }
  std::vector<std::string> missing;
  if (void* h = dlopen("libblis.so.4", RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND)) {
    if (auto f = reinterpret_cast<Sgemm>(dlsym(h, "cblas_sgemm"))) {
      if (auto set = reinterpret_cast<void (*)(std::int64_t)>(dlsym(h, "bli_thread_set_num_threads"))) set(threads);
      Variant v;
      v.name = "BLIS (libblis.so.4)";
      v.run = cblas_run(f);
      vs.push_back(std::move(v));
    }
  } else {
    missing.push_back("BLIS: libblis.so.4 not found (apt install libblis4)");
  }
  if (void* h = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_LOCAL)) {
    if (auto f = reinterpret_cast<DnnlSgemm>(dlsym(h, "dnnl_sgemm"))) {
      Variant v;
      v.name = "oneDNN dnnl_sgemm";
      v.run = [&, f] { f('N', 'N', M, N, K, 1.f, A.data(), K, B.data(), N, 0.f, C.data(), N); };
      vs.push_back(std::move(v));
    }
    if (auto f = reinterpret_cast<DnnlBf16>(dlsym(h, "dnnl_gemm_bf16bf16f32"))) {
      Variant v;
      v.name = "oneDNN gemm_bf16bf16f32";
      v.dtype = "bf16 in, fp32 out";
      v.run = [&, f] { f('N', 'N', M, N, K, 1.f, Ab.data(), K, Bb.data(), N, 0.f, C.data(), N); };
      vs.push_back(std::move(v));
    } else {
      missing.push_back("oneDNN: no dnnl_gemm_bf16bf16f32 in libdnnl.so.2");
    }
  } else {
    missing.push_back("oneDNN: libdnnl.so.2 not found (apt install libdnnl2)");
  }

  const double flops = 2.0 * double(M) * double(N) * double(K);
  for (int r = 0; r < rounds; ++r)
    for (std::size_t i = 0; i < vs.size(); ++i) {
      Variant& v = vs[r % 2 == 0 ? i : vs.size() - 1 - i];  // alternate the order: drift hits every variant alike
      if (v.prepare) v.prepare();
      if (v.out.empty()) std::fill(C.begin(), C.end(), std::nanf(""));  // a library that writes nothing shows as NaN
      v.run();  // warm-up (and packing buffers)
      if (v.out.empty()) v.out = C;
      const auto t0 = std::chrono::steady_clock::now();
      for (int k = 0; k < reps; ++k) v.run();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
      v.gflops.push_back(flops / s / 1e9);
    }
  if (openblas_get_corename) detail::select_openblas_core(own_pick);

  double ref = 0;
  for (const auto& v : vs)
    if (v.name.find("(its own pick)") != std::string::npos) ref = median(v.gflops);
  if (ref == 0 && !vs.empty()) ref = median(vs.front().gflops);
  nlohmann::ordered_json out;
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  out["date"] = date, out["cpu"] = cpu.describe(), out["openblas_own_pick"] = own_pick, out["threads"] = threads;
  out["m"] = M, out["n"] = N, out["k"] = K, out["rounds"] = rounds, out["reps"] = reps, out["loadavg_at_end"] = loadavg();
  out["rows"] = nlohmann::json::array();
  std::printf("\n%-36s %-18s %10s %8s %8s %10s\n", "library / kernel", "dtype", "GFLOP/s", "min", "max", "vs own pick");
  for (const auto& v : vs) {
    double err = 0, den = 0;  // against the first fp32 variant's product
    for (std::size_t i = 0; i < C.size(); ++i) {
      const double d = double(v.out[i]) - double(vs.front().out[i]);
      err += d * d, den += double(vs.front().out[i]) * double(vs.front().out[i]);
    }
    const double rel = std::sqrt(err / std::max(den, 1e-30)), med = median(v.gflops);
    std::printf("%-36s %-18s %10.1f %8.1f %8.1f %9.2fx   rel.diff %.1e\n", v.name.c_str(), v.dtype.c_str(), med,
                *std::min_element(v.gflops.begin(), v.gflops.end()), *std::max_element(v.gflops.begin(), v.gflops.end()),
                med / ref, rel);
    out["rows"].push_back({{"name", v.name}, {"dtype", v.dtype}, {"gflops_median", med}, {"gflops", v.gflops},
                           {"ratio_to_own_pick", med / ref}, {"rel_diff_to_first", rel}});
  }
  for (const auto& m : missing) std::printf("not measured: %s\n", m.c_str());
  out["not_measured"] = missing;
  if (!json.empty()) std::ofstream(json) << out.dump(1) << "\n";
  return 0;
}
