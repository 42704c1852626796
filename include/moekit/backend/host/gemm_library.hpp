#pragma once
// Which GEMM library and kernel the host backend runs, and the fix for OpenBLAS's generic fallback.
//
// Debian 12's OpenBLAS (0.3.21, DYNAMIC_ARCH) picks its kernel from the CPU model when it loads; a CPU
// newer than the library (a recent Xeon) falls back to the generic `Prescott` kernel (SSE3), about 5x
// slower than its AVX-512 kernel on the same machine (docs/benchmarks.md). gemm_library() runs once,
// before the first host GEMM: it reads the CPU's instruction sets (cpuid), compares them with the
// kernel OpenBLAS chose, and when that kernel is below them re-selects the kernel that fits (OpenBLAS's
// own OPENBLAS_CORETYPE mechanism, applied after load). It never overrides a choice the user made:
//   OPENBLAS_CORETYPE=<name>   OpenBLAS's own variable: kept as it is
//   MOEKIT_BLAS_CORETYPE=keep  keep OpenBLAS's pick (then warn if it is a fallback)
//   MOEKIT_BLAS_CORETYPE=<name> this OpenBLAS kernel (SkylakeX, Cooperlake, Haswell, Zen, ...)
// Other CBLAS libraries (BLIS, MKL) select their kernels themselves; then only the name is reported.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

// OpenBLAS's entry points, weak: they are null when another CBLAS library is linked.
extern "C" {
char* openblas_get_corename(void) __attribute__((weak));
char* openblas_get_config(void) __attribute__((weak));
void gotoblas_dynamic_init(void) __attribute__((weak));  // DYNAMIC_ARCH builds only
void gotoblas_dynamic_quit(void) __attribute__((weak));
}

namespace moekit::backend::host {

// The instruction sets a GEMM kernel can use (x86-64; all false elsewhere).
struct CpuFeatures {
  bool avx = false, avx2 = false, fma = false;
  bool avx512 = false;       // F, DQ, BW and VL: what OpenBLAS's SkylakeX kernels need
  bool avx512_bf16 = false;  // VDPBF16PS (Cooper Lake, Sapphire Rapids, Zen 4)
  bool amx_bf16 = false;     // AMX tiles with bf16 (Sapphire Rapids and later)
  // 1 SSE only, 2 AVX, 3 AVX2 + FMA, 4 AVX-512.
  int level() const { return avx512 ? 4 : (avx2 && fma) ? 3 : avx ? 2 : 1; }
  std::string describe() const {
    std::string s = level() == 4 ? "AVX-512" : level() == 3 ? "AVX2+FMA" : level() == 2 ? "AVX" : "SSE";
    if (avx512_bf16) s += ", AVX512-BF16";
    if (amx_bf16) s += ", AMX-BF16";
    return s;
  }
  static CpuFeatures detect() {
    CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    unsigned long long xcr0 = 0;
    if (osxsave) {
      unsigned lo = 0, hi = 0;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
    }
    const bool ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xE6) == 0xE6, tiles = (xcr0 & 0x60000) == 0x60000;
    f.avx = avx && ymm;
    f.fma = fma && ymm;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
      f.avx2 = ((b >> 5) & 1) && ymm;
      f.avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1) && zmm;
      f.amx_bf16 = ((d >> 22) & 1) && ((d >> 24) & 1) && tiles;
      unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
      if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) f.avx512_bf16 = ((a1 >> 5) & 1) && f.avx512;
    }
#endif
    return f;
  }
};

// The instruction-set level of an OpenBLAS x86-64 kernel (CpuFeatures::level's scale); 0 if unknown.
inline int openblas_core_level(const std::string& core) {
  for (const char* c : {"SkylakeX", "Cooperlake", "SapphireRapids"})
    if (core == c) return 4;
  for (const char* c : {"Haswell", "Zen"})
    if (core == c) return 3;
  for (const char* c : {"Sandybridge", "Bulldozer", "Piledriver", "Steamroller", "Excavator"})
    if (core == c) return 2;
  for (const char* c : {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom", "Nano", "Katmai", "Coppermine",
                        "Northwood", "Banias", "Athlon", "Opteron", "Barcelona", "Bobcat"})
    if (core == c) return 1;
  return 0;
}
// The OpenBLAS kernel for these features when `picked` is below them; empty when it fits (or when
// `picked` is not a kernel this table knows, e.g. another architecture).
inline std::string better_openblas_core(const std::string& picked, const CpuFeatures& f) {
  const int have = openblas_core_level(picked);
  if (have == 0 || have >= f.level()) return {};
  switch (f.level()) {
    case 4: return f.avx512_bf16 ? "Cooperlake" : "SkylakeX";
    case 3: return "Haswell";
    case 2: return "Sandybridge";
  }
  return {};
}

// What the host GEMMs run on, after the fix (if any) was applied.
struct GemmLibrary {
  std::string library;       // "OpenBLAS 0.3.21 ..." (its config line), or "CBLAS (not OpenBLAS)"
  std::string kernel;        // the OpenBLAS kernel in use; empty for other libraries
  std::string picked;        // the kernel OpenBLAS chose itself, when it was replaced
  std::string cpu;           // CpuFeatures::describe()
  bool fallback = false;     // the kernel in use is below the CPU's instruction set
  std::string warning;       // what to tell the user, or empty
  // One line for a program's banner.
  std::string line() const {
    std::string s = "GEMM: " + library;
    if (!kernel.empty()) s += ", kernel " + kernel;
    if (!picked.empty()) s += " (OpenBLAS picked " + picked + "; replaced)";
    s += " | CPU: " + cpu;
    if (!warning.empty()) s += " | WARNING: " + warning;
    return s;
  }
};

namespace detail {
// Re-selects OpenBLAS's kernel (as OPENBLAS_CORETYPE does at load). False when the library cannot.
inline bool select_openblas_core(const std::string& core) {
  if (!gotoblas_dynamic_init || !gotoblas_dynamic_quit || !openblas_get_corename) return false;
  const char* before = std::getenv("OPENBLAS_CORETYPE");
  const std::string saved = before ? before : "";
  setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
  gotoblas_dynamic_quit();
  gotoblas_dynamic_init();
  if (before) setenv("OPENBLAS_CORETYPE", saved.c_str(), 1);
  else unsetenv("OPENBLAS_CORETYPE");
  return openblas_core_level(openblas_get_corename()) > 0 && std::string(openblas_get_corename()) == core;
}

inline GemmLibrary setup_gemm_library() {
  GemmLibrary g;
  const CpuFeatures f = CpuFeatures::detect();
  g.cpu = f.describe();
  if (!openblas_get_corename) {
    g.library = "CBLAS (not OpenBLAS: it selects its own kernels)";
    return g;
  }
  const std::string picked = openblas_get_corename();
  const char* user = std::getenv("OPENBLAS_CORETYPE");
  const char* ours = std::getenv("MOEKIT_BLAS_CORETYPE");
  std::string want;
  if (ours && std::string(ours) != "keep" && std::string(ours) != "auto") want = ours;
  else if (!user && !(ours && std::string(ours) == "keep")) want = better_openblas_core(picked, f);
  if (!want.empty() && want != picked) {
    if (select_openblas_core(want)) {
      g.picked = picked;
    } else {
      g.warning = "could not select the OpenBLAS kernel " + want + " (not a DYNAMIC_ARCH build, or an unknown name)";
      if (gotoblas_dynamic_init && std::string(openblas_get_corename()) != picked) select_openblas_core(picked);
    }
  }
  g.kernel = openblas_get_corename();
  g.library = openblas_get_config ? openblas_get_config() : "OpenBLAS";  // its config line names the kernel in use
  g.fallback = better_openblas_core(g.kernel, f).size() > 0;
  if (g.fallback && g.warning.empty())
    g.warning = "OpenBLAS kernel " + g.kernel + " is a generic fallback on a CPU with " + g.cpu + " (unset OPENBLAS_CORETYPE, " +
                "or set MOEKIT_BLAS_CORETYPE=" + better_openblas_core(g.kernel, f) + ")";
  return g;
}
}  // namespace detail

// The GEMM library in use, set up on the first call (the host GEMMs call it before their first
// product). Thread-safe; the fix, if any, happens once per process.
inline const GemmLibrary& gemm_library() {
  static const GemmLibrary g = detail::setup_gemm_library();
  return g;
}

}  // namespace moekit::backend::host
