#pragma once
// bf16 on the host: conversions, and the GEMM C (fp32) = alpha op(A) op(B) + beta C with bf16 A and B
// accumulated in fp32 (backend::Host<bf16>, docs/design.md §6's numerics as on the CUDA backend).
//
// Where it runs (bf16_gemm(), chosen once per process):
//   oneDNN's gemm_bf16bf16f32 (libdnnl.so.2, Debian libdnnl2, loaded at run time: no build dependency),
//     on a CPU with bf16 instructions (AVX512-BF16 or AMX-BF16): its AVX512-BF16 / AMX kernels;
//   otherwise both operands converted to fp32 and multiplied by the fp32 BLAS (correct everywhere, no
//     faster than fp32: the banner says so).
//   MOEKIT_BF16_GEMM=fp32 forces the conversion path (the tests run both), =onednn asks for oneDNN
//   even on a CPU without bf16 instructions (oneDNN then emulates them).
// Row-major, as backend/host/blas.hpp's gemm. Products with one bf16 and one fp32 operand convert the
// bf16 one (the router's and gating residual's small GEMMs).
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "moekit/backend/host/blas.hpp"
#include "moekit/backend/host/convert.hpp"
#include "moekit/backend/host/gemm_library.hpp"
#include "moekit/core/bf16.hpp"

namespace moekit::backend::host {

// ---- the bf16 GEMM's library ----------------------------------------------------------------------------
struct Bf16Gemm {
  // oneDNN's entry point (row-major, as dnnl_sgemm): exported by libdnnl, declared here to load it at
  // run time.
  using Fn = int (*)(char, char, std::int64_t, std::int64_t, std::int64_t, float, const std::uint16_t*, std::int64_t,
                     const std::uint16_t*, std::int64_t, float, float*, std::int64_t);
  Fn fn = nullptr;      // null: convert to fp32
  bool native = false;  // the CPU has bf16 instructions
  std::string what;     // "oneDNN 2.6.3 gemm_bf16bf16f32 (AVX512-BF16)", or why fp32
  std::string line() const { return "bf16 GEMM: " + what; }
};

namespace detail {
inline Bf16Gemm setup_bf16_gemm() {
  Bf16Gemm g;
  const CpuFeatures f = CpuFeatures::detect();
  g.native = f.avx512_bf16 || f.amx_bf16;
  const char* env = std::getenv("MOEKIT_BF16_GEMM");
  const std::string want = env ? env : "auto";
  if (want == "fp32") {
    g.what = "converted to fp32 (MOEKIT_BF16_GEMM=fp32)";
    return g;
  }
  if (!g.native && want != "onednn") {
    g.what = "converted to fp32 (this CPU has no bf16 instructions: " + f.describe() + "; no faster than fp32)";
    return g;
  }
  void* h = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!h) h = dlopen("libdnnl.so.3", RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    g.what = "converted to fp32 (libdnnl.so.2 not found: apt install libdnnl2 for oneDNN's bf16 kernels)";
    return g;
  }
  g.fn = reinterpret_cast<Bf16Gemm::Fn>(dlsym(h, "dnnl_gemm_bf16bf16f32"));
  if (!g.fn) {
    g.what = "converted to fp32 (this libdnnl has no dnnl_gemm_bf16bf16f32)";
    return g;
  }
  std::string version = "oneDNN";
  struct Version {
    int major, minor, patch;
  };
  if (auto v = reinterpret_cast<const Version* (*)()>(dlsym(h, "dnnl_version")))
    version += " " + std::to_string(v()->major) + "." + std::to_string(v()->minor) + "." + std::to_string(v()->patch);
  g.what = version + " gemm_bf16bf16f32 (" + (f.amx_bf16 ? "AMX-BF16" : f.avx512_bf16 ? "AVX512-BF16" : "emulated: no bf16 instructions") + ")";
  return g;
}
}  // namespace detail

namespace detail {
// The process's choice (set up on first use); tests swap it to run both paths in one process.
inline Bf16Gemm& bf16_gemm_state() {
  static Bf16Gemm g = setup_bf16_gemm();
  return g;
}
}  // namespace detail
inline const Bf16Gemm& bf16_gemm() { return detail::bf16_gemm_state(); }

namespace detail {
// A per-thread fp32 scratch of at least n elements (slot 0 or 1: the two operands).
inline float* scratch(int slot, std::int64_t n) {
  thread_local std::vector<float> s[2];
  if (s[slot].size() < std::size_t(n)) s[slot].resize(std::size_t(n));
  return s[slot].data();
}
}  // namespace detail

// C[m,n] (fp32) = alpha op(A) op(B) + beta C with A, B bf16 (storage as backend/host/blas.hpp's gemm).
inline void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t kk, float alpha, const bf16* a,
                 const bf16* b, float beta, float* c) {
  if (m == 0 || n == 0) return;
  const Bf16Gemm& g = bf16_gemm();
  if (g.fn && kk > 0) {
    const std::int64_t lda = trans_a ? m : kk, ldb = trans_b ? kk : n;
    // A status other than dnnl_success (0; e.g. unimplemented on a CPU without AVX-512 under
    // MOEKIT_BF16_GEMM=onednn) leaves C unwritten: fall through to the conversion.
    if (g.fn(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, kk, alpha, reinterpret_cast<const std::uint16_t*>(a), lda,
             reinterpret_cast<const std::uint16_t*>(b), ldb, beta, c, n) == 0)
      return;
  }
  float* af = detail::scratch(0, m * kk);
  float* bf = detail::scratch(1, kk * n);
  convert(a, af, m * kk);
  convert(b, bf, kk * n);
  gemm<float>(trans_a, trans_b, m, n, kk, alpha, af, bf, beta, c);
}
// One bf16 operand and one fp32: the bf16 one converted (small GEMMs: the router's, the gating residual's).
inline void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t kk, float alpha, const float* a,
                 const bf16* b, float beta, float* c) {
  float* bf = detail::scratch(1, kk * n);
  convert(b, bf, kk * n);
  gemm<float>(trans_a, trans_b, m, n, kk, alpha, a, bf, beta, c);
}
inline void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t kk, float alpha, const bf16* a,
                 const float* b, float beta, float* c) {
  float* af = detail::scratch(0, m * kk);
  convert(a, af, m * kk);
  gemm<float>(trans_a, trans_b, m, n, kk, alpha, af, b, beta, c);
}

}  // namespace moekit::backend::host
