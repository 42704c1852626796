#pragma once
// The FFN experts of the host backend over expert-contiguous rows: expert e's rows are
// [offsets[e], offsets[e+1]) of xp. Weights in the parameter table's layout (layer/parameter_table.hpp):
// w13 holds each expert's [w1; w3] block ([wf, d], w1 rows first), w2 each expert's [d, f] (f may be a
// tensor-parallel slice of d_expert, wf = f or 2f). Shared by the single-rank layer and the distributed one (whose experts
// are the local shard and whose rows arrive by all-to-all).
// Phases, not a loop of per-expert phases: a few OpenMP regions per call (each phase's experts spread
// over the threads, or one multi-threaded GEMM after another: FfnShapes::spread).
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "moekit/backend/host/activation_rows.hpp"
#include "moekit/backend/host/blas.hpp"
#include "moekit/backend/host/convert.hpp"
#include "moekit/backend/host/gemm_bf16.hpp"
#include "moekit/experts/activation.hpp"

#ifndef MOEKIT_OMP_MIN_WORK
#define MOEKIT_OMP_MIN_WORK 32768
#endif

namespace moekit::backend::host {

template <class T>
struct FfnShapes {
  std::int64_t d = 0, f = 0;
  const std::int64_t* offsets = nullptr;  // [experts + 1]
  std::int64_t experts = 0;
  std::int64_t wf = 0;  // rows of an expert's w13 block: f, or 2f when gated
  std::int64_t rows() const { return offsets[experts]; }
  std::int64_t w1(std::int64_t e) const { return e * wf * d; }  // element offsets into w13 / w2
  std::int64_t w3(std::int64_t e) const { return e * wf * d + f * d; }
  std::int64_t w2(std::int64_t e) const { return e * d * f; }
  // Spread: the experts' GEMMs in one OpenMP region, each expert's on one thread (the BLAS runs
  // single-threaded inside a parallel region), instead of one multi-threaded GEMM after another:
  // many small experts then do not pay a team start and a barrier each (spread_experts() decides).
  bool spread = false;
  template <class F>
  void for_each_expert(F&& fn) const {
    if (spread) {
#pragma omp parallel for schedule(dynamic, 1)
      for (std::int64_t e = 0; e < experts; ++e)
        if (offsets[e + 1] > offsets[e]) fn(e, offsets[e], offsets[e + 1] - offsets[e]);
      return;
    }
    for (std::int64_t e = 0; e < experts; ++e)
      if (offsets[e + 1] > offsets[e]) fn(e, offsets[e], offsets[e + 1] - offsets[e]);
  }
};

// The FFN experts' biases (experts::FfnOptions::ffn_bias), or none (null): b13 holds each expert's
// [b1 | b3] (wf values: a row of h13), b2 each expert's columns [b2_col0, b2_col0 + b2_cols) of its [d]
// output bias (the tp slice this rank adds to its partial rows); g13 / g2 their gradients, alike.
template <class T, class G = T>
struct FfnBias {
  const T *b13 = nullptr, *b2 = nullptr;
  G *g13 = nullptr, *g2 = nullptr;
  std::int64_t b2_col0 = 0, b2_cols = 0;
};
namespace detail {
// y[r·ld + j] += b[j] for r < rows, j < n.
template <class Y, class B>
void add_bias_rows(Y* y, std::int64_t ld, std::int64_t rows, const B* b, std::int64_t n) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < n; ++j) y[r * ld + j] += static_cast<Y>(b[j]);
}
// g[j] += Σ_r x[r·ld + j] for r < rows, j < n (the bias gradient of those rows).
template <class G, class X>
void add_column_sums(const X* x, std::int64_t ld, std::int64_t rows, std::int64_t n, G* g) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < n; ++j) g[j] += static_cast<G>(x[r * ld + j]);
}
}  // namespace detail

// Whether to spread the experts over the threads (FfnShapes::spread): MOEKIT_EXPERT_SPREAD=on|off, or
// by default when there are at least 4 experts per thread.
inline bool spread_experts(std::int64_t experts) {
  static const int mode = [] {
    const char* v = std::getenv("MOEKIT_EXPERT_SPREAD");
    return !v ? 0 : std::string(v) == "on" ? 1 : std::string(v) == "off" ? -1 : 0;
  }();
  if (mode != 0) return mode > 0;
  return experts >= 4 * std::int64_t(omp_get_max_threads());
}

// h13 = xp W13^T [+ b13] ([h1 | h3] per row, one GEMM per expert: [w1; w3] is one block), a = act(h1, h3),
// yp = a W2^T [+ b2]. a == nullptr (evaluation mode): a is written over h13's first f columns (leading
// dimension wf), so nothing beyond h13 is allocated. Returns the GEMM FLOPs issued.
template <class Act, class T>
std::int64_t ffn_forward(const FfnShapes<T>& s, const T* w13, const T* w2, const T* xp, T* h13, T* a, T* yp, const Act& act = Act{},
                         const FfnBias<T>& b = {}) {
  const std::int64_t d = s.d, f = s.f, wf = s.wf, rows = s.rows();
  s.for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
    gemm<T>(false, true, m, wf, d, T(1), &xp[r0 * d], &w13[s.w1(e)], T(0), &h13[r0 * wf]);
    if (b.b13) detail::add_bias_rows(&h13[r0 * wf], wf, m, &b.b13[e * wf], wf);
  });
  T* av = a ? a : h13;
  const std::int64_t lda = a ? f : wf;
#pragma omp parallel for schedule(static) if (rows * f >= MOEKIT_OMP_MIN_WORK)
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* h = &h13[r * wf];
    activation_row<Act>(h, Act::gated ? h + f : h, &av[r * lda], f, act);
  }
  s.for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
    gemm<T>(false, true, m, d, f, T(1), &av[r0 * lda], lda, &w2[s.w2(e)], f, T(0), &yp[r0 * d], d);
    if (b.b2) detail::add_bias_rows(&yp[r0 * d + b.b2_col0], d, m, &b.b2[e * b.b2_cols], b.b2_cols);
  });
  return 2 * rows * wf * d + 2 * rows * d * f;
}

// Given dyp (d rows), adds the weight gradients and overwrites dyp with d(xp). a is overwritten with
// dA, h13 with dH13 ([dH1 | dH3]): the forward's buffers are consumed. The [w1; w3] block's gradient
// and d(xp) are one GEMM each.
template <class Act, class T>
void ffn_backward(const FfnShapes<T>& s, const T* w13, const T* w2, const T* xp, T* h13, T* a, T* dyp, T* gw13, T* gw2,
                  const Act& act = Act{}, const FfnBias<T>& b = {}) {
  const std::int64_t d = s.d, f = s.f, wf = s.wf, rows = s.rows();
  s.for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
    if (b.g2) detail::add_column_sums(&dyp[r0 * d + b.b2_col0], d, m, b.b2_cols, &b.g2[e * b.b2_cols]);
    gemm<T>(true, false, d, f, m, T(1), &dyp[r0 * d], &a[r0 * f], T(1), &gw2[s.w2(e)]);
    gemm<T>(false, false, m, f, d, T(1), &dyp[r0 * d], &w2[s.w2(e)], T(0), &a[r0 * f]);
  });
#pragma omp parallel for schedule(static) if (rows * f >= MOEKIT_OMP_MIN_WORK)
  for (std::int64_t r = 0; r < rows; ++r) {
    T* h = &h13[r * wf];
    activation_backward_row<Act>(h, Act::gated ? h + f : h, &a[r * f], h, Act::gated ? h + f : nullptr, f, act);
  }
  s.for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
    if (b.g13) detail::add_column_sums(&h13[r0 * wf], wf, m, wf, &b.g13[e * wf]);
    gemm<T>(true, false, wf, d, m, T(1), &h13[r0 * wf], &xp[r0 * d], T(1), &gw13[s.w1(e)]);
    gemm<T>(false, false, m, d, wf, T(1), &h13[r0 * wf], &w13[s.w1(e)], T(0), &dyp[r0 * d]);
  });
}

// ---- bf16 storage (backend::Host<bf16>) -------------------------------------------------------------
// The same FFN with bf16 rows and weights: every GEMM multiplies bf16 operands and accumulates in fp32
// (backend/host/gemm_bf16.hpp), the pre-activations h13 stay fp32, the activation a is rounded to bf16
// (the next GEMM's operand), and so are the outputs yp and d(xp) (rows the layer combines or
// exchanges), after their fp32 GEMMs into `acc` (rows × max(d, f) fp32).
template <class Act>
std::int64_t ffn_forward(const FfnShapes<bf16>& s, const bf16* w13, const bf16* w2, const bf16* xp, float* h13, bf16* a, float* acc,
                         bf16* yp, const Act& act = Act{}, const FfnBias<bf16, float>& b = {}) {
  const std::int64_t d = s.d, f = s.f, wf = s.wf, rows = s.rows();
  s.for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
    gemm(false, true, m, wf, d, 1.f, &xp[r0 * d], &w13[s.w1(e)], 0.f, &h13[r0 * wf]);
    if (b.b13) detail::add_bias_rows(&h13[r0 * wf], wf, m, &b.b13[e * wf], wf);
  });
#pragma omp parallel if (rows * f >= MOEKIT_OMP_MIN_WORK)
  {
    std::vector<float> row(static_cast<std::size_t>(f));
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* h = &h13[r * wf];
      activation_row<Act>(h, Act::gated ? h + f : h, row.data(), f, act);
      convert(row.data(), &a[r * f], f);
    }
  }
  s.for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
    gemm(false, true, m, d, f, 1.f, &a[r0 * f], &w2[s.w2(e)], 0.f, &acc[r0 * d]);
    if (b.b2) detail::add_bias_rows(&acc[r0 * d + b.b2_col0], d, m, &b.b2[e * b.b2_cols], b.b2_cols);
  });
  convert(acc, yp, rows * d);
  return 2 * rows * wf * d + 2 * rows * d * f;
}

// Given dyp, adds the fp32 weight gradients and overwrites dyp with d(xp) (rounded to bf16). dh13
// receives [dH1 | dH3] in bf16; acc holds dA, then d(xp) before rounding.
template <class Act>
void ffn_backward(const FfnShapes<bf16>& s, const bf16* w13, const bf16* w2, const bf16* xp, const float* h13, const bf16* a,
                  bf16* dh13, float* acc, bf16* dyp, float* gw13, float* gw2, const Act& act = Act{}, const FfnBias<bf16, float>& b = {}) {
  const std::int64_t d = s.d, f = s.f, wf = s.wf, rows = s.rows();
  s.for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
    if (b.g2) detail::add_column_sums(&dyp[r0 * d + b.b2_col0], d, m, b.b2_cols, &b.g2[e * b.b2_cols]);
    gemm(true, false, d, f, m, 1.f, &dyp[r0 * d], &a[r0 * f], 1.f, &gw2[s.w2(e)]);
    gemm(false, false, m, f, d, 1.f, &dyp[r0 * d], &w2[s.w2(e)], 0.f, &acc[r0 * f]);
  });
#pragma omp parallel if (rows * f >= MOEKIT_OMP_MIN_WORK)
  {
    std::vector<float> g(static_cast<std::size_t>(wf));
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* h = &h13[r * wf];
      activation_backward_row<Act>(h, Act::gated ? h + f : h, &acc[r * f], g.data(), Act::gated ? g.data() + f : nullptr, f, act);
      convert(g.data(), &dh13[r * wf], wf);
    }
  }
  s.for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
    if (b.g13) detail::add_column_sums(&dh13[r0 * wf], wf, m, wf, &b.g13[e * wf]);
    gemm(true, false, wf, d, m, 1.f, &dh13[r0 * wf], &xp[r0 * d], 1.f, &gw13[s.w1(e)]);
    gemm(false, false, m, d, wf, 1.f, &dh13[r0 * wf], &w13[s.w1(e)], 0.f, &acc[r0 * d]);
  });
  convert(acc, dyp, rows * d);
}

}  // namespace moekit::backend::host
