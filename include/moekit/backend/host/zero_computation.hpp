#pragma once
// The host backend's zero-computation experts: every kind of the layer's set (experts/zero_computation.hpp)
// through its functors, on the token's own row, after the FFN rows are combined. Expert e of kind m is
// that kind's q = e − first(m); its tensors are q's slices of the regions its kind declared.
#include <array>
#include <cstdint>
#include <vector>

#include "moekit/backend/host/convert.hpp"
#include "moekit/experts/policy.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/layer/zc_tensors.hpp"

namespace moekit::backend::host {

// S: storage type of the parameters; C: compute type (S, or float for bf16). Kinds: std::tuple of the
// kinds in routing order.
template <class S, class C, class Kinds>
class ZeroComputation {
  using List = experts::ZcList<Kinds>;
  using I64 = std::int64_t;
  static constexpr int K = List::size;
  static constexpr int kMaxT = experts::ZcWeights<C>::kMax;
  static constexpr bool kCopies = !std::is_same_v<S, C>;  // bf16: the kinds' tensors in fp32 (small)

 public:
  static constexpr int kSaved = List::max_saved;

  ZeroComputation() = default;
  ZeroComputation(const MoeConfig& cfg, const ParameterTable& t) : d_(cfg.d_model), at_(ZcTensorLayout<Kinds>::of(cfg, t)) {
    I64 first = cfg.num_ffn_experts, copy_at = 0;
    for (int m = 0; m < K; ++m) {
      first_[m] = first;
      first += at_.count[m];
      for (int i = 0; i < at_.tensors[m]; ++i) copy_[m][i] = copy_at, copy_at += at_.size[m][i];
    }
    copies_.resize(std::size_t(kCopies ? copy_at : 0));
  }

  // Before a forward: the tensors in the compute type (bf16: copied; otherwise read in place).
  void begin(const S* values) {
    values_ = values;
    if constexpr (kCopies)
      for (int m = 0; m < K; ++m)
        for (int i = 0; i < at_.tensors[m]; ++i)
          convert(values + at_.offset[m][i], copies_.data() + copy_[m][i], at_.size[m][i]);
  }

  // y[t] += Σ over t's kept zero-computation slots of gate · E(x[t]), in slot order; keeps kSaved
  // scalars per slot for the backward.
  void forward(const RoutingPlan<C>& p, const C* x, C* y) {
    saved_.resize(std::size_t(p.layout.slots) * std::size_t(kSaved > 0 ? kSaved : 1));
    const I64 d = d_;
    [[maybe_unused]] const I64 work = I64(p.layout.slots) * d;  // read by the OpenMP clause only
#pragma omp parallel for schedule(static) if (work >= MOEKIT_OMP_MIN_WORK)
    for (I64 t = 0; t < p.layout.tokens; ++t)
      for_each_slot(p, t, [&]<class Z>(Z, I64 s, const experts::ZcWeights<C>& w) {
        Z::forward(w, x + t * d, int(d), p.gate[s], y + t * d, saved(s));
      });
  }
  std::size_t bytes() const { return (copies_.capacity() + saved_.capacity()) * sizeof(C); }
  // The gate's gradient of zero-computation slot s of token t: dy[t] · E(x[t]).
  C dgate(const RoutingPlan<C>& p, I64 s, const C* xt, const C* dyt) const {
    C dg = 0;
    visit_slot(p, s, [&]<class Z>(Z, const experts::ZcWeights<C>& w) {
      dg = Z::backward(w, xt, int(d_), p.gate[s], dyt, saved(s), static_cast<C*>(nullptr), experts::ZcGrads<C>{});
    });
    return dg;
  }
  // dx[t] += each kept slot's input gradient, and the kinds' weight gradients into `grads` (the flat
  // gradient buffer, laid out by the table), in token order: one fixed order keeps them deterministic.
  void backward(const RoutingPlan<C>& p, const C* x, const C* dy, C* dx, C* grads) const {
    const I64 d = d_;
    for (I64 t = 0; t < p.layout.tokens; ++t)
      for_each_slot(p, t, [&]<class Z>(Z, I64 s, const experts::ZcWeights<C>& w) {
        experts::ZcGrads<C> g;
        int m = 0, q = 0;
        locate(p.expert[s], m, q);
        for (int i = 0; i < at_.tensors[m]; ++i) g.w[i] = grads + at_.offset[m][i] + I64(q) * at_.stride[m][i];
        (void)Z::backward(w, x + t * d, int(d), p.gate[s], dy + t * d, saved(s), dx + t * d, g);
      });
  }

 private:
  void locate(int e, int& m, int& q) const {
    for (m = 0; m + 1 < K && e >= first_[m] + at_.count[m]; ++m) {
    }
    q = int(e - first_[m]);
  }
  experts::ZcWeights<C> weights(int m, int q) const {
    experts::ZcWeights<C> w;
    for (int i = 0; i < at_.tensors[m]; ++i) {
      if constexpr (kCopies) w.w[i] = copies_.data() + copy_[m][i] + I64(q) * at_.stride[m][i];
      else w.w[i] = values_ + at_.offset[m][i] + I64(q) * at_.stride[m][i];
    }
    return w;
  }
  template <class F>
  void visit_slot(const RoutingPlan<C>& p, I64 s, F&& f) const {
    int m = 0, q = 0;
    locate(p.expert[s], m, q);
    const experts::ZcWeights<C> w = weights(m, q);
    List::visit(m, [&]<class Z>(Z z) { f(z, w); });
  }
  template <class F>
  void for_each_slot(const RoutingPlan<C>& p, I64 t, F&& f) const {
    for (I64 s = p.layout.begin(int(t)); s < p.layout.end(int(t)); ++s)
      if (p.row[s] == kSlotZeroComputation)
        visit_slot(p, s, [&]<class Z>(Z z, const experts::ZcWeights<C>& w) { f(z, s, w); });
  }
  C* saved(I64 s) const { return saved_.data() + s * (kSaved > 0 ? kSaved : 1); }

  I64 d_ = 0;
  ZcTensorLayout<Kinds> at_;             // where each kind's tensors lie in the table
  std::array<I64, K> first_{};           // each kind's first expert id
  std::array<std::array<I64, kMaxT>, K> copy_{};  // bf16: where each family lies in copies_
  const S* values_ = nullptr;
  std::vector<C> copies_;
  mutable std::vector<C> saved_;  // [slots, kSaved]
};

}  // namespace moekit::backend::host
