// backend/host/gemm_library.hpp: the kernel rules worked by hand, the cpuid reading against GCC's own
// CPU detection, and (with OpenBLAS built DYNAMIC_ARCH, as Debian's) the generic fallback replaced by
// the kernel that fits, with correct products after the switch.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <moekit/backend/host/blas.hpp>
#include <string>
#include <vector>

using namespace moekit::backend::host;

TEST_CASE("better_openblas_core: a kernel below the CPU's instruction set is replaced by the one that fits") {
  CpuFeatures sse;
  CpuFeatures avx2 = sse;
  avx2.avx = avx2.avx2 = avx2.fma = true;
  CpuFeatures skx = avx2;
  skx.avx512 = true;
  CpuFeatures spr = skx;
  spr.avx512_bf16 = spr.amx_bf16 = true;
  CHECK(avx2.level() == 3);
  CHECK(spr.level() == 4);
  CHECK(better_openblas_core("Prescott", spr) == "Cooperlake");  // a new Xeon that OpenBLAS 0.3.21 does not know
  CHECK(better_openblas_core("Prescott", skx) == "SkylakeX");
  CHECK(better_openblas_core("Sandybridge", avx2) == "Haswell");
  CHECK(better_openblas_core("Haswell", skx) == "SkylakeX");
  CHECK(better_openblas_core("Haswell", avx2).empty());
  CHECK(better_openblas_core("Zen", avx2).empty());
  CHECK(better_openblas_core("Cooperlake", spr).empty());
  CHECK(better_openblas_core("SkylakeX", skx).empty());
  CHECK(better_openblas_core("Prescott", sse).empty());  // nothing better to run
  CHECK(better_openblas_core("NEOVERSEN1", spr).empty());  // not an x86 kernel this table knows
  CHECK(spr.describe() == "AVX-512, AVX512-BF16, AMX-BF16");
}

#if defined(__x86_64__)
TEST_CASE("CpuFeatures::detect agrees with GCC's CPU detection") {
  const CpuFeatures f = CpuFeatures::detect();
  CHECK(f.avx2 == bool(__builtin_cpu_supports("avx2")));
  CHECK(f.fma == bool(__builtin_cpu_supports("fma")));
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  CHECK(f.avx512 == avx512);
  if (f.avx512_bf16) CHECK(f.avx512);
}
#endif

TEST_CASE("gemm_library: OpenBLAS's generic fallback is replaced, and products stay right") {
  if (!openblas_get_corename || !gotoblas_dynamic_init || std::getenv("OPENBLAS_CORETYPE") || std::getenv("MOEKIT_BLAS_CORETYPE")) {
    MESSAGE("skipped: not a DYNAMIC_ARCH OpenBLAS, or the kernel is set by the environment");
    return;
  }
  const std::string original = openblas_get_corename();
  const CpuFeatures f = CpuFeatures::detect();
  REQUIRE(detail::select_openblas_core("Prescott"));  // what Debian's OpenBLAS picks on a CPU newer than itself
  const GemmLibrary g = detail::setup_gemm_library();
  CAPTURE(g.line());
  if (f.level() > 1) {
    CHECK(g.picked == "Prescott");
    CHECK(g.kernel == better_openblas_core("Prescott", f));
    CHECK_FALSE(g.fallback);
    CHECK(g.warning.empty());
  } else {
    CHECK(g.kernel == "Prescott");
  }
  // A product after the switch against a plain loop.
  const int m = 37, n = 29, k = 53;
  std::vector<float> a(std::size_t(m * k)), b(std::size_t(k * n)), c(std::size_t(m * n));
  for (int i = 0; i < m * k; ++i) a[std::size_t(i)] = float(std::sin(0.1 * i));
  for (int i = 0; i < k * n; ++i) b[std::size_t(i)] = float(std::cos(0.07 * i));
  gemm<float>(false, false, m, n, k, 1.f, a.data(), b.data(), 0.f, c.data());
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double ref = 0;
      for (int l = 0; l < k; ++l) ref += double(a[std::size_t(i * k + l)]) * double(b[std::size_t(l * n + j)]);
      CHECK(c[std::size_t(i * n + j)] == doctest::Approx(ref).epsilon(1e-5));
    }
  // The user's choice wins: with MOEKIT_BLAS_CORETYPE=keep a fallback stays, with a warning.
  REQUIRE(detail::select_openblas_core("Prescott"));
  setenv("MOEKIT_BLAS_CORETYPE", "keep", 1);
  const GemmLibrary kept = detail::setup_gemm_library();
  unsetenv("MOEKIT_BLAS_CORETYPE");
  CHECK(kept.kernel == "Prescott");
  CHECK(kept.fallback == (f.level() > 1));
  if (f.level() > 1) CHECK(kept.warning.find("generic fallback") != std::string::npos);
  detail::select_openblas_core(original);
}
