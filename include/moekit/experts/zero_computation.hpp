#pragma once
// Zero-computation experts (MoE++, arXiv 2410.07348): no GEMM, finished in the combine step on the
// token's own row. A kind is a struct that brings its count, its tensors and its arithmetic as
// host/device functors (compiled by g++ and nvcc); experts::Set<Ffn<Act>, Kinds...> takes any of them
// (the ZeroComputationKind concept below), and both backends call the functors:
//   Zero      E(x) = 0                                   nothing to compute
//   Copy      E(x) = x                                   dE/dx = identity
//   Constant  E(x) = a1 x + a2 v, [a1, a2] = softmax(Wc x), Wc [2, D] and v [D] trainable
// A kind's interface (S is the compute type, float or double; d the model width):
//   static constexpr const char* name;                  // for messages
//   static std::int64_t count(const MoeConfig&);        // its experts (an option "num_<name>_zc_experts"
//                                                       // for a kind outside MoeConfig: N_E counts it)
//   static void declare_parameters(ParamDecls&, const MoeConfig&);  // per-expert tensors, each its own
//                                                       // region, kReplicated (every rank runs every ZC expert)
//   static constexpr int kSaved;                        // scalars a slot keeps from forward for backward
//   forward(w, x, d, g, y, saved):       y += g · E(x) for one token; may write kSaved scalars
//   backward(w, x, d, g, dy, saved, dx, gw) -> dy · E(x) (the gate's gradient); when non-null also
//       dx += g · (∂E/∂x)ᵀ dy and gw.w[i] += g · (∂E/∂θ_i)ᵀ dy
// w.w[i] / gw.w[i] point at this expert's slice of the i-th family the kind declared. The host backend
// calls them for every kind; the CUDA backend runs Zero, Copy and Constant in its own kernels (Constant's
// mix from one GEMM over all of them) and any other kind through them (backend/cuda/zero_computation.cuh).
#include <cmath>
#include <concepts>
#include <cstdint>

#include "moekit/core/config.hpp"
#include "moekit/core/macros.hpp"
#include "moekit/core/parameter.hpp"

namespace moekit::experts {

// One zero-computation expert's tensors (or their gradients), in the order its kind declared them.
template <class P>
struct ZcTensors {
  static constexpr int kMax = 4;
  P w[kMax] = {};
};
template <class S>
using ZcWeights = ZcTensors<const S*>;
template <class S>
using ZcGrads = ZcTensors<S*>;

struct Zero {
  static constexpr const char* name = "zero";
  static constexpr int kSaved = 0;
  static std::int64_t count(const MoeConfig& c) { return c.num_zero_experts; }
  static void declare_parameters(ParamDecls&, const MoeConfig&) {}
  template <class S>
  MOEKIT_HD static void forward(const ZcWeights<S>&, const S*, int, S, S*, S*) {}
  template <class S>
  MOEKIT_HD static S backward(const ZcWeights<S>&, const S*, int, S, const S*, const S*, S*, const ZcGrads<S>&) {
    return S(0);
  }
};

struct Copy {
  static constexpr const char* name = "copy";
  static constexpr int kSaved = 0;
  static std::int64_t count(const MoeConfig& c) { return c.num_copy_experts; }
  static void declare_parameters(ParamDecls&, const MoeConfig&) {}
  template <class S>
  MOEKIT_HD static void forward(const ZcWeights<S>&, const S* x, int d, S g, S* y, S*) {
    for (int i = 0; i < d; ++i) y[i] += g * x[i];
  }
  template <class S>
  MOEKIT_HD static S backward(const ZcWeights<S>&, const S* x, int d, S g, const S* dy, const S*, S* dx, const ZcGrads<S>&) {
    S dg = 0;
    for (int i = 0; i < d; ++i) {
      dg += dy[i] * x[i];
      if (dx) dx[i] += g * dy[i];
    }
    return dg;
  }
};

struct Constant {
  static constexpr const char* name = "constant";
  static constexpr int kSaved = 2;  // a1, a2
  static std::int64_t count(const MoeConfig& c) { return c.num_constant_experts; }
  // Wc [2, D] ("const_wc") and v [D] ("const_v") per expert.
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    const std::int64_t n = c.num_constant_experts, m = c.d_model;
    const double bd = 1.0 / std::sqrt(double(m));
    d.add({"const_wc", "constant.{}.wc.weight", n, {2, m}, ParamShard::kReplicated, "", "constant", bd, false});
    d.add({"const_v", "constant.{}.v", n, {m}, ParamShard::kReplicated, "", "constant", bd, false});
  }
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
  template <class S>
  MOEKIT_HD static void forward(const ZcWeights<S>& w, const S* x, int d, S g, S* y, S* saved) {
    S a1, a2;
    mix(w.w[0], x, d, a1, a2);
    saved[0] = a1, saved[1] = a2;
    for (int i = 0; i < d; ++i) y[i] += g * (a1 * x[i] + a2 * w.w[1][i]);
  }
  // E = a1 x + a2 v, dE = g·dy: d a1 = dE·x, d a2 = dE·v, then the softmax's backward.
  template <class S>
  MOEKIT_HD static S backward(const ZcWeights<S>& w, const S* x, int d, S g, const S* dy, const S* saved, S* dx,
                              const ZcGrads<S>& gw) {
    const S *wc = w.w[0], *v = w.w[1];
    const S a1 = saved[0], a2 = saved[1];
    S dx_dot = 0, dv_dot = 0;
    for (int i = 0; i < d; ++i) {
      dx_dot += dy[i] * x[i];
      dv_dot += dy[i] * v[i];
    }
    if (!dx && !gw.w[0] && !gw.w[1]) return a1 * dx_dot + a2 * dv_dot;
    S dz1, dz2;
    mix_backward(a1, a2, g * dx_dot, g * dv_dot, dz1, dz2);
    for (int i = 0; i < d; ++i) {
      if (dx) dx[i] += a1 * g * dy[i] + dz1 * wc[i] + dz2 * wc[d + i];
      if (gw.w[1]) gw.w[1][i] += a2 * g * dy[i];
      if (gw.w[0]) {
        gw.w[0][i] += dz1 * x[i];
        gw.w[0][d + i] += dz2 * x[i];
      }
    }
    return a1 * dx_dot + a2 * dv_dot;
  }
};

// What experts::Set accepts after its Ffn<Act>.
template <class Z>
concept ZeroComputationKind = requires(ParamDecls& p, const MoeConfig& c, const ZcWeights<double>& w, const ZcGrads<double>& gw,
                                       const double* x, double* y) {
  { Z::name } -> std::convertible_to<const char*>;
  { Z::kSaved } -> std::convertible_to<int>;
  { Z::count(c) } -> std::convertible_to<std::int64_t>;
  Z::declare_parameters(p, c);
  Z::forward(w, x, 1, 1.0, y, y);
  { Z::backward(w, x, 1, 1.0, x, x, y, gw) } -> std::convertible_to<double>;
};

// Zero, Copy and Constant come first among the zero-computation experts, in that order (MoeConfig's own
// counts); any other kind follows in its Set's order.
template <class Z>
inline constexpr bool is_builtin_zc = std::same_as<Z, Zero> || std::same_as<Z, Copy> || std::same_as<Z, Constant>;

}  // namespace moekit::experts
