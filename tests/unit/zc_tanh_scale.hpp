#pragma once
// A zero-computation kind that the library does not have, written as a user would
// (experts/zero_computation.hpp's interface): the tests' proof that the set of kinds is open.
//   TanhScale  E(x) = tanh(u · x) · x, u [D] trainable per expert (one saved scalar: a = tanh(u · x))
// Its count is the option "num_tanh_zc_experts" (a "*_zc_experts" key: N_E counts it).
#include <cmath>
#include <cstdint>
#include <tuple>

#include <moekit/core/config.hpp>
#include <moekit/core/macros.hpp>
#include <moekit/core/options.hpp>
#include <moekit/core/parameter.hpp>
#include <moekit/experts/zero_computation.hpp>

namespace moekit_test {

struct TanhScaleOptions {
  std::int64_t num_tanh_zc_experts = 0;
  static constexpr auto fields() {
    return std::make_tuple(moekit::ConfigField<std::int64_t, TanhScaleOptions>{
        "num_tanh_zc_experts", &TanhScaleOptions::num_tanh_zc_experts, moekit::FieldRule::kNonNegative});
  }
};

struct TanhScale {
  static constexpr const char* name = "tanh_scale";
  using options = TanhScaleOptions;
  static constexpr int kSaved = 1;
  static std::int64_t count(const moekit::MoeConfig& c) { return moekit::read_options<TanhScaleOptions>(c).num_tanh_zc_experts; }
  static void declare_parameters(moekit::ParamDecls& d, const moekit::MoeConfig& c) {
    d.add({"tanh_u", "tanh.{}.u", count(c), {c.d_model}, moekit::ParamShard::kReplicated, "", "tanh",
           1.0 / std::sqrt(double(c.d_model)), false});
  }
  template <class S>
  MOEKIT_HD static void forward(const moekit::experts::ZcWeights<S>& w, const S* x, int d, S g, S* y, S* saved) {
    S z = 0;
    for (int i = 0; i < d; ++i) z += w.w[0][i] * x[i];
    const S a = std::tanh(z);
    saved[0] = a;
    for (int i = 0; i < d; ++i) y[i] += g * a * x[i];
  }
  // dE_i/dx_j = a δ_ij + (1 − a²) u_j x_i;  dE_i/du_j = (1 − a²) x_j x_i.
  template <class S>
  MOEKIT_HD static S backward(const moekit::experts::ZcWeights<S>& w, const S* x, int d, S g, const S* dy, const S* saved, S* dx,
                              const moekit::experts::ZcGrads<S>& gw) {
    const S a = saved[0];
    S dot = 0;
    for (int i = 0; i < d; ++i) dot += dy[i] * x[i];
    const S c = g * (S(1) - a * a) * dot;
    for (int i = 0; i < d; ++i) {
      if (dx) dx[i] += g * a * dy[i] + c * w.w[0][i];
      if (gw.w[0]) gw.w[0][i] += c * x[i];
    }
    return a * dot;
  }
};

// The same arithmetic as experts::Copy, as a kind of its own: its layer must equal Copy's bit for bit.
struct MyCopyOptions {
  std::int64_t num_mycopy_zc_experts = 0;
  static constexpr auto fields() {
    return std::make_tuple(moekit::ConfigField<std::int64_t, MyCopyOptions>{
        "num_mycopy_zc_experts", &MyCopyOptions::num_mycopy_zc_experts, moekit::FieldRule::kNonNegative});
  }
};
struct MyCopy {
  static constexpr const char* name = "mycopy";
  using options = MyCopyOptions;
  static constexpr int kSaved = 0;
  static std::int64_t count(const moekit::MoeConfig& c) { return moekit::read_options<MyCopyOptions>(c).num_mycopy_zc_experts; }
  static void declare_parameters(moekit::ParamDecls&, const moekit::MoeConfig&) {}
  template <class S>
  MOEKIT_HD static void forward(const moekit::experts::ZcWeights<S>&, const S* x, int d, S g, S* y, S*) {
    for (int i = 0; i < d; ++i) y[i] += g * x[i];
  }
  template <class S>
  MOEKIT_HD static S backward(const moekit::experts::ZcWeights<S>&, const S* x, int d, S g, const S* dy, const S*, S* dx,
                              const moekit::experts::ZcGrads<S>&) {
    S dot = 0;
    for (int i = 0; i < d; ++i) {
      dot += dy[i] * x[i];
      if (dx) dx[i] += g * dy[i];
    }
    return dot;
  }
};

}  // namespace moekit_test
