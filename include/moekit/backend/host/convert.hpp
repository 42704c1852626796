#pragma once
// Element conversions of the host backend: the compute type of a storage type (fp32 for bf16), and
// conversions between them (bf16: round to nearest even, core/bf16.hpp).
#include <cstdint>
#include <type_traits>

#include "moekit/core/bf16.hpp"

#ifndef MOEKIT_OMP_MIN_WORK
#define MOEKIT_OMP_MIN_WORK 32768
#endif

namespace moekit::backend::host {

// The compute type of a storage type: fp32 for bf16, the type itself otherwise.
template <class S>
using compute_t = std::conditional_t<std::is_same_v<S, bf16>, float, S>;

template <class C>
inline C to_compute(bf16 v) {
  return C(bf16::to_float(v.bits));
}
template <class C, class T>
  requires std::is_arithmetic_v<T>
inline C to_compute(T v) {
  return C(v);
}
template <class S, class C>
inline S from_compute(C v) {
  if constexpr (std::is_same_v<S, bf16>) return bf16(float(v));
  else return S(v);
}
// dst[i] = src[i] in dst's type (bf16: round to nearest even).
template <class D, class S>
void convert(const S* src, D* dst, std::int64_t n) {
  using M = std::conditional_t<std::is_same_v<D, double> || std::is_same_v<S, double>, double, float>;
#pragma omp parallel for schedule(static) if (n >= 4 * MOEKIT_OMP_MIN_WORK)
  for (std::int64_t i = 0; i < n; ++i) dst[i] = from_compute<D>(to_compute<M>(src[i]));
}

}  // namespace moekit::backend::host
