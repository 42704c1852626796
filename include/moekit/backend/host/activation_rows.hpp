#pragma once
// The FFN's element-wise activation over rows of h13 = [h1 | h3] (backend/host/ffn.hpp), forward and
// backward. The scalar functors of experts/activation.hpp call exp() once per element, which the
// compiler cannot vectorise without -ffast-math; SwiGLU in fp32 on a CPU with AVX-512 runs 16 lanes
// at a time with glibc's vector expf (libmvec.so.1's `_ZGVeN16v_expf`, loaded at run time: no link
// dependency). Without libmvec (another libc) or AVX-512 every row takes the scalar path;
// MOEKIT_VECTOR_EXP=off forces it. Per element the vector path differs from the scalar one by
// libmvec's expf error (a few ulp); the same input always gives the same output on one machine.
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "moekit/backend/host/gemm_library.hpp"  // CpuFeatures
#include "moekit/experts/activation.hpp"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include <immintrin.h>
#define MOEKIT_HOST_SIMD_ACT 1
#endif

namespace moekit::backend::host {

namespace detail {
#if defined(MOEKIT_HOST_SIMD_ACT)
// libmvec's 16-lane expf, or null (no AVX-512, no libmvec, or MOEKIT_VECTOR_EXP=off).
inline void* vector_expf_symbol() {
  static void* const fn = []() -> void* {
    const char* env = std::getenv("MOEKIT_VECTOR_EXP");
    if ((env && std::string(env) == "off") || !CpuFeatures::detect().avx512) return nullptr;
    void* h = dlopen("libmvec.so.1", RTLD_NOW | RTLD_LOCAL);
    return h ? dlsym(h, "_ZGVeN16v_expf") : nullptr;
  }();
  return fn;
}
inline bool vector_expf() { return vector_expf_symbol() != nullptr; }
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  return reinterpret_cast<__m512 (*)(__m512)>(vector_expf_symbol())(x);
}
// a[i] = silu(h1[i]) * h3[i] for i < n; the tail (n % 16) by the scalar functor.
__attribute__((target("avx512f"))) inline void swiglu_forward_avx512(const float* h1, const float* h3, float* a, std::int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(h1 + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, e));
    _mm512_storeu_ps(a + i, _mm512_mul_ps(silu, _mm512_loadu_ps(h3 + i)));
  }
  for (; i < n; ++i) a[i] = act::apply(act::SwiGLU{}, h1[i], h3[i]);
}
// g1 = da h3 s (1 + h1 (1 - s)), g3 = da h1 s with s = sigmoid(h1); g1 may alias h1 and g3 h3.
__attribute__((target("avx512f"))) inline void swiglu_backward_avx512(const float* h1, const float* h3, const float* da, float* g1,
                                                                      float* g3, std::int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(h1 + i), y = _mm512_loadu_ps(h3 + i), d = _mm512_loadu_ps(da + i);
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    const __m512 ds = _mm512_mul_ps(d, s);
    _mm512_storeu_ps(g1 + i, _mm512_mul_ps(_mm512_mul_ps(ds, y), _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one)));
    _mm512_storeu_ps(g3 + i, _mm512_mul_ps(ds, x));
  }
  for (; i < n; ++i) {
    float a1, a3;
    act::backward(act::SwiGLU{}, h1[i], h3[i], da[i], a1, a3);
    g1[i] = a1, g3[i] = a3;
  }
}
#endif
}  // namespace detail

// One row: a[i] = act(h1[i], h3[i]) (h3 is read by gated activations only).
template <class Act, class T>
void activation_row(const T* h1, const T* h3, T* a, std::int64_t n, const Act& act = Act{}) {
#if defined(MOEKIT_HOST_SIMD_ACT)
  if constexpr (std::is_same_v<Act, act::SwiGLU> && std::is_same_v<T, float>)
    if (detail::vector_expf()) return detail::swiglu_forward_avx512(h1, h3, a, n);
#endif
  for (std::int64_t i = 0; i < n; ++i) a[i] = act.apply(h1[i], h3[i]);
}
// One row of the backward: g1 (and g3, gated) from da; g1 may alias h1, g3 h3.
template <class Act, class T>
void activation_backward_row(const T* h1, const T* h3, const T* da, T* g1, T* g3, std::int64_t n, const Act& act = Act{}) {
#if defined(MOEKIT_HOST_SIMD_ACT)
  if constexpr (std::is_same_v<Act, act::SwiGLU> && std::is_same_v<T, float>)
    if (detail::vector_expf()) return detail::swiglu_backward_avx512(h1, h3, da, g1, g3, n);
#endif
  for (std::int64_t i = 0; i < n; ++i) {
    T a1, a3 = 0;
    act.backward(h1[i], h3[i], da[i], a1, a3);
    g1[i] = a1;
    if constexpr (Act::gated) g3[i] = a3;
  }
}

}  // namespace moekit::backend::host
