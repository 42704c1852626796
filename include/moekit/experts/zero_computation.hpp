#pragma once
// MoE++ constant expert for one token (arXiv 2410.07348), host/device: E(x) = a1 x + a2 v with
// [a1, a2] = softmax(Wc x). Zero and copy experts need no helper (0 and x).
#include <cmath>

#include "moekit/core/macros.hpp"

namespace moekit::experts {

// [a1, a2] = softmax(Wc x); wc is [2, d] row-major.
template <class S>
MOEKIT_HD void constant_mix(const S* wc, const S* x, int d, S& a1, S& a2) {
  S z1 = 0, z2 = 0;
  for (int i = 0; i < d; ++i) {
    z1 += wc[i] * x[i];
    z2 += wc[d + i] * x[i];
  }
  const S m = z1 > z2 ? z1 : z2;
  const S e1 = std::exp(z1 - m), e2 = std::exp(z2 - m);
  a1 = e1 / (e1 + e2);
  a2 = e2 / (e1 + e2);
}

// Backward of E = a1 x + a2 v given dE: adds into dx, dv and dwc ([2, d]).
template <class S>
MOEKIT_HD void constant_backward(const S* wc, const S* x, const S* v, S a1, S a2, const S* de, int d, S* dx, S* dv,
                                 S* dwc) {
  S da1 = 0, da2 = 0;
  for (int i = 0; i < d; ++i) {
    da1 += de[i] * x[i];
    da2 += de[i] * v[i];
  }
  const S s = a1 * da1 + a2 * da2;
  const S dz1 = a1 * (da1 - s), dz2 = a2 * (da2 - s);
  for (int i = 0; i < d; ++i) {
    if (dx) dx[i] += a1 * de[i] + dz1 * wc[i] + dz2 * wc[d + i];
    if (dv) dv[i] += a2 * de[i];
    if (dwc) {
      dwc[i] += dz1 * x[i];
      dwc[d + i] += dz2 * x[i];
    }
  }
}

}  // namespace moekit::experts
