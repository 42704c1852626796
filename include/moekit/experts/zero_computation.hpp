#pragma once
// MoE++ zero-computation experts (arXiv 2410.07348): no GEMM, finished in the combine step on the
// token's own row. Each type carries its arithmetic as host/device functors (compiled by g++ and nvcc),
// which the host backend and the CUDA kernels both call:
//   Zero      E(x) = 0                                   nothing to compute
//   Copy      E(x) = x                                   dE/dx = identity
//   Constant  E(x) = a1 x + a2 v, [a1, a2] = softmax(Wc x), Wc [2, D] and v [D] trainable
#include <cmath>

#include "moekit/core/macros.hpp"

namespace moekit::experts {

struct Zero {};
struct Copy {};

struct Constant {
  // [a1, a2] = softmax(z1, z2) with z = Wc x (the CUDA backend gets z from one GEMM over every
  // constant expert, the host from mix() below).
  template <class S>
  MOEKIT_HD static void mix_from_logits(S z1, S z2, S& a1, S& a2) {
    const S m = z1 > z2 ? z1 : z2;
    const S e1 = std::exp(z1 - m), e2 = std::exp(z2 - m);
    a1 = e1 / (e1 + e2);
    a2 = e2 / (e1 + e2);
  }
  // [a1, a2] = softmax(Wc x) for one token; wc is [2, d] row-major.
  template <class S>
  MOEKIT_HD static void mix(const S* wc, const S* x, int d, S& a1, S& a2) {
    S z1 = 0, z2 = 0;
    for (int i = 0; i < d; ++i) {
      z1 += wc[i] * x[i];
      z2 += wc[d + i] * x[i];
    }
    mix_from_logits(z1, z2, a1, a2);
  }
  // The softmax's backward: dz from d a1 = dE·x, d a2 = dE·v.
  template <class S>
  MOEKIT_HD static void mix_backward(S a1, S a2, S da1, S da2, S& dz1, S& dz2) {
    const S s = a1 * da1 + a2 * da2;
    dz1 = a1 * (da1 - s);
    dz2 = a2 * (da2 - s);
  }
  // Backward of E = a1 x + a2 v for one token given dE: adds into dx, dv and dwc ([2, d]); any may be null.
  template <class S>
  MOEKIT_HD static void backward(const S* wc, const S* x, const S* v, S a1, S a2, const S* de, int d, S* dx, S* dv, S* dwc) {
    S da1 = 0, da2 = 0;
    for (int i = 0; i < d; ++i) {
      da1 += de[i] * x[i];
      da2 += de[i] * v[i];
    }
    S dz1, dz2;
    mix_backward(a1, a2, da1, da2, dz1, dz2);
    for (int i = 0; i < d; ++i) {
      if (dx) dx[i] += a1 * de[i] + dz1 * wc[i] + dz2 * wc[d + i];
      if (dv) dv[i] += a2 * de[i];
      if (dwc) {
        dwc[i] += dz1 * x[i];
        dwc[d + i] += dz2 * x[i];
      }
    }
  }
};

}  // namespace moekit::experts
