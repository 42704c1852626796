#pragma once
// A naive MoE++ layer in double precision (docs/design.md §2-§4, issue 3), written with plain loops from the
// formulas alone and sharing no code with the library: the oracle of the host backend's forward with
// zero/copy/constant experts, the gating residual, MoE++ capacities and the heterogeneous LBL.
// Library-free on purpose: it includes no moekit header.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/random.hpp"

namespace refpp {

// Expert order everywhere: FFN [0, n_ffn), then zero, then copy, then constant.
enum class Kind { kFfn, kZero, kCopy, kConstant };

struct Cfg {
  int D = 0, F = 0;
  int n_ffn = 0, n_zero = 0, n_copy = 0, n_const = 0;
  int K = 1;
  bool sigmoid = false, renorm = false;
  int act = 0;  // 0 swiglu, 1 gelu, 2 relu
  double gamma = 0.0, tau = 1.0;

  int E() const { return n_ffn + n_zero + n_copy + n_const; }
  int n_zc() const { return n_zero + n_copy + n_const; }
  Kind kind(int e) const {
    if (e < n_ffn) return Kind::kFfn;
    if (e < n_ffn + n_zero) return Kind::kZero;
    if (e < n_ffn + n_zero + n_copy) return Kind::kCopy;
    return Kind::kConstant;
  }
  int constant_index(int e) const { return e - n_ffn - n_zero - n_copy; }
  double eta(int e) const { return kind(e) == Kind::kFfn ? 1.0 : tau; }
};

// torch Linear layout: router [E][D], w1/w3 [n_ffn][F][D], w2 [n_ffn][D][F], wc [n_const][2][D],
// v [n_const][D], wg [E][E] (logits_e += sum_j wg[e][j] * prev_j).
struct Weights {
  std::vector<double> router, w1, w2, w3, wc, v, wg;
};

struct Out {
  std::vector<double> y, logits, probs, scores, gates;  // probs: the P of the LBL; scores: what top-k sorts
  std::vector<int> idx;                                 // [T][K]
  std::vector<char> kept;                               // [T][K]
  std::vector<std::int64_t> routed, kept_count;         // [E]
  std::int64_t cap_ffn = -1, cap_zc = -1;               // -1: dropless
  std::vector<double> f, P;                             // [E], as used in the LBL
  double lbl = 0, zloss = 0;
};

// MoE++ capacities (docs/design.md §4). Returns -1 (no limit) when gamma == 0.
inline std::int64_t capacity(const Cfg& c, std::int64_t T, bool ffn) {
  if (c.gamma <= 0) return -1;
  if (c.n_zc() == 0) return std::int64_t(std::ceil(c.gamma * c.K * double(T) / c.E()));
  const double denom = c.tau * c.n_ffn + c.n_zc();
  return ffn ? std::int64_t(std::ceil(c.gamma * c.tau * c.K * double(T) / denom))
             : std::int64_t(std::ceil(c.gamma * c.K * double(T) / denom));
}

inline double act_fn(int act, double h1, double h3) {
  if (act == 0) return h1 / (1.0 + std::exp(-h1)) * h3;
  if (act == 1) return 0.5 * h1 * (1.0 + std::erf(h1 / std::sqrt(2.0)));
  return h1 > 0 ? h1 : 0.0;
}

// One expert applied to one token: out[D].
inline void expert(const Cfg& c, const Weights& w, int e, const double* x, double* out) {
  const int D = c.D, F = c.F;
  switch (c.kind(e)) {
    case Kind::kZero:
      for (int i = 0; i < D; ++i) out[i] = 0.0;
      return;
    case Kind::kCopy:
      for (int i = 0; i < D; ++i) out[i] = x[i];
      return;
    case Kind::kConstant: {
      const int q = c.constant_index(e);
      double z[2] = {0, 0};
      for (int r = 0; r < 2; ++r)
        for (int i = 0; i < D; ++i) z[r] += w.wc[(size_t(q) * 2 + r) * D + i] * x[i];
      const double m = std::max(z[0], z[1]);
      const double e0 = std::exp(z[0] - m), e1 = std::exp(z[1] - m);
      const double a1 = e0 / (e0 + e1), a2 = e1 / (e0 + e1);
      for (int i = 0; i < D; ++i) out[i] = a1 * x[i] + a2 * w.v[size_t(q) * D + i];
      return;
    }
    case Kind::kFfn: {
      std::vector<double> a(F);
      for (int f = 0; f < F; ++f) {
        double h1 = 0, h3 = 0;
        for (int i = 0; i < D; ++i) {
          h1 += w.w1[(size_t(e) * F + f) * D + i] * x[i];
          if (c.act == 0) h3 += w.w3[(size_t(e) * F + f) * D + i] * x[i];
        }
        a[f] = act_fn(c.act, h1, h3);
      }
      for (int i = 0; i < D; ++i) {
        double acc = 0;
        for (int f = 0; f < F; ++f) acc += w.w2[(size_t(e) * D + i) * F + f] * a[f];
        out[i] = acc;
      }
      return;
    }
  }
}

// The forward of one layer on T tokens x [T][D]. prev: the previous layer's logits [T][E] (nullptr for
// none). f_counts/f_tokens: when given, f_i = f_counts[i] / (K * f_tokens) (GlobalBatch's buffer)
// instead of this batch's routed counts.
inline Out forward(const Cfg& c, const std::vector<double>& x, const Weights& w, int T,
                   const std::vector<double>* prev = nullptr, const std::vector<std::int64_t>* f_counts = nullptr,
                   std::int64_t f_tokens = 0) {
  const int E = c.E(), K = c.K, D = c.D;
  Out o;
  o.y.assign(size_t(T) * D, 0.0);
  o.logits.assign(size_t(T) * E, 0.0);
  o.probs.assign(size_t(T) * E, 0.0);
  o.scores.assign(size_t(T) * E, 0.0);
  o.gates.assign(size_t(T) * K, 0.0);
  o.idx.assign(size_t(T) * K, 0);
  o.kept.assign(size_t(T) * K, 1);
  o.routed.assign(E, 0);
  o.kept_count.assign(E, 0);
  double zsum = 0;
  for (int t = 0; t < T; ++t) {
    double* l = &o.logits[size_t(t) * E];
    for (int e = 0; e < E; ++e) {
      double acc = 0;
      for (int i = 0; i < D; ++i) acc += w.router[size_t(e) * D + i] * x[size_t(t) * D + i];
      if (prev)
        for (int j = 0; j < E; ++j) acc += w.wg[size_t(e) * E + j] * (*prev)[size_t(t) * E + j];
      l[e] = acc;
    }
    double mx = l[0];
    for (int e = 1; e < E; ++e) mx = std::max(mx, l[e]);
    double se = 0;
    for (int e = 0; e < E; ++e) se += std::exp(l[e] - mx);
    const double lse = mx + std::log(se);
    zsum += lse * lse;
    double* s = &o.scores[size_t(t) * E];
    double stot = 0;
    for (int e = 0; e < E; ++e) {
      s[e] = c.sigmoid ? 1.0 / (1.0 + std::exp(-l[e])) : std::exp(l[e] - lse);
      stot += s[e];
    }
    for (int e = 0; e < E; ++e) o.probs[size_t(t) * E + e] = c.sigmoid ? s[e] / stot : s[e];
    // All experts sorted by (score descending, index ascending); the first K are picked.
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return s[a] != s[b] ? s[a] > s[b] : a < b; });
    double picked = 0;
    for (int j = 0; j < K; ++j) picked += s[order[j]];
    for (int j = 0; j < K; ++j) {
      o.idx[size_t(t) * K + j] = order[j];
      const double sc = s[order[j]];
      o.gates[size_t(t) * K + j] = (c.sigmoid || c.renorm) ? sc / picked : sc;
      o.routed[order[j]]++;
    }
  }
  o.cap_ffn = capacity(c, T, true);
  o.cap_zc = capacity(c, T, false);
  if (c.gamma > 0) {
    for (int e = 0; e < E; ++e) {
      const std::int64_t cap = c.kind(e) == Kind::kFfn ? o.cap_ffn : o.cap_zc;
      std::vector<int> slots;  // t*K + j
      for (int sl = 0; sl < T * K; ++sl)
        if (o.idx[sl] == e) slots.push_back(sl);
      // Highest score first; equal scores: the earlier token first (so the later one is dropped).
      std::sort(slots.begin(), slots.end(), [&](int a, int b) {
        const double sa = o.scores[size_t(a / K) * E + e], sb = o.scores[size_t(b / K) * E + e];
        return sa != sb ? sa > sb : a < b;
      });
      for (size_t r = size_t(cap); r < slots.size(); ++r) o.kept[slots[r]] = 0;
    }
  }
  std::vector<double> out(D);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < K; ++j) {
      if (!o.kept[size_t(t) * K + j]) continue;
      const int e = o.idx[size_t(t) * K + j];
      o.kept_count[e]++;
      expert(c, w, e, &x[size_t(t) * D], out.data());
      for (int i = 0; i < D; ++i) o.y[size_t(t) * D + i] += o.gates[size_t(t) * K + j] * out[i];
    }
  o.f.assign(E, 0.0);
  o.P.assign(E, 0.0);
  double lbl = 0;
  for (int e = 0; e < E; ++e) {
    for (int t = 0; t < T; ++t) o.P[e] += o.probs[size_t(t) * E + e];
    o.P[e] = T > 0 ? o.P[e] / T : 0.0;
    if (f_counts) o.f[e] = f_tokens > 0 ? double((*f_counts)[e]) / (double(K) * double(f_tokens)) : 0.0;
    else o.f[e] = T > 0 ? double(o.routed[e]) / (double(K) * T) : 0.0;
    lbl += c.eta(e) * o.f[e] * o.P[e];
  }
  o.lbl = E * lbl;
  o.zloss = T > 0 ? zsum / T : 0.0;
  return o;
}

// ---- Test data, also library-free -------------------------------------------------------------

using moekit_test::random_vec;

inline Weights random_weights(const Cfg& c, std::mt19937_64& g, bool residual) {
  Weights w;
  const size_t E = c.E(), N = c.n_ffn, D = c.D, F = c.F, Q = c.n_const;
  w.router = random_vec(E * D, g, 0.8);
  w.w1 = random_vec(N * F * D, g, 0.5);
  w.w2 = random_vec(N * D * F, g, 0.5);
  if (c.act == 0) w.w3 = random_vec(N * F * D, g, 0.5);
  w.wc = random_vec(Q * 2 * D, g, 0.7);
  w.v = random_vec(Q * D, g, 1.0);
  if (residual) w.wg = random_vec(E * E, g, 0.5);
  return w;
}

// The parameters a layer must list, by the names and shapes of the spec, with their values.
struct Named {
  std::vector<std::int64_t> shape;
  std::vector<double> values;
};
inline std::map<std::string, Named> named_weights(const Cfg& c, const Weights& w, bool residual) {
  std::map<std::string, Named> m;
  const std::int64_t E = c.E(), D = c.D, F = c.F;
  auto slice = [](const std::vector<double>& v, std::int64_t off, std::int64_t n) {
    return std::vector<double>(v.begin() + off, v.begin() + off + n);
  };
  m["gate.weight"] = {{E, D}, w.router};
  for (int e = 0; e < c.n_ffn; ++e) {
    const std::string p = "experts." + std::to_string(e) + ".";
    m[p + "w1.weight"] = {{F, D}, slice(w.w1, e * F * D, F * D)};
    m[p + "w2.weight"] = {{D, F}, slice(w.w2, e * D * F, D * F)};
    if (c.act == 0) m[p + "w3.weight"] = {{F, D}, slice(w.w3, e * F * D, F * D)};
  }
  for (int q = 0; q < c.n_const; ++q) {
    const std::string p = "constant." + std::to_string(q) + ".";
    m[p + "wc.weight"] = {{2, D}, slice(w.wc, q * 2 * D, 2 * D)};
    m[p + "v"] = {{D}, slice(w.v, q * D, D)};
  }
  if (residual) m["gate_residual.weight"] = {{E, E}, w.wg};
  return m;
}

// Copies named weights into any layer whose parameters() lists {name, value, shape} (no moekit type
// needed). Returns "" or what did not match the spec's names and shapes.
template <class Layer>
std::string load_named(Layer& layer, const std::map<std::string, Named>& expect) {
  auto ps = layer.parameters();
  if (ps.size() != expect.size())
    return "the layer lists " + std::to_string(ps.size()) + " parameters, the spec " + std::to_string(expect.size());
  for (auto& p : ps) {
    const auto it = expect.find(p.name);
    if (it == expect.end()) return "unexpected parameter " + p.name;
    if (std::vector<std::int64_t>(p.shape.begin(), p.shape.end()) != it->second.shape) return "wrong shape of " + p.name;
    using V = std::remove_reference_t<decltype(*p.value)>;
    for (size_t i = 0; i < it->second.values.size(); ++i) p.value[i] = static_cast<V>(it->second.values[i]);
  }
  return "";
}

}  // namespace refpp
