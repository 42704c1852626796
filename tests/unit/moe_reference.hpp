#pragma once
// A naive MoE layer in double precision, written with plain loops and sharing no code with the
// library: the oracle of the host backend's forward (docs/design.md §2-§4).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace ref {

struct Cfg {
  int D = 0, F = 0, E = 0, K = 1;
  bool sigmoid = false, renorm = false;
  int act = 0;  // 0 swiglu, 1 gelu, 2 relu
  double gamma = 0.0;
  std::vector<double> bias;  // router::BiasBalanced: added to the scores for the selection only (empty: none)
};

struct Weights {  // torch layout: router [E][D], w1/w3 [E][F][D], w2 [E][D][F]
  std::vector<double> router, w1, w2, w3;
};

struct Out {
  std::vector<double> y, logits, gates, probs;
  std::vector<int> idx, kept_count, routed_count;
  std::vector<bool> kept;
  double lbl = 0, zloss = 0;
};

inline double activation(int act, double h1, double h3) {
  if (act == 0) return h1 / (1.0 + std::exp(-h1)) * h3;
  if (act == 1) return 0.5 * h1 * (1.0 + std::erf(h1 / std::sqrt(2.0)));
  return h1 > 0 ? h1 : 0.0;
}

inline Out forward(const Cfg& c, const std::vector<double>& x, const Weights& w, int T) {
  Out o;
  o.y.assign(size_t(T) * c.D, 0.0);
  o.logits.assign(size_t(T) * c.E, 0.0);
  o.probs.assign(size_t(T) * c.E, 0.0);
  o.gates.assign(size_t(T) * c.K, 0.0);
  o.idx.assign(size_t(T) * c.K, 0);
  o.kept.assign(size_t(T) * c.K, true);
  o.routed_count.assign(c.E, 0);
  o.kept_count.assign(c.E, 0);
  std::vector<double> score(size_t(T) * c.E);
  double zsum = 0;
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < c.E; ++e) {
      double l = 0;
      for (int i = 0; i < c.D; ++i) l += w.router[e * c.D + i] * x[t * c.D + i];
      o.logits[t * c.E + e] = l;
    }
    double mx = -1e300, se = 0;
    for (int e = 0; e < c.E; ++e) mx = std::max(mx, o.logits[t * c.E + e]);
    for (int e = 0; e < c.E; ++e) se += std::exp(o.logits[t * c.E + e] - mx);
    const double lse = mx + std::log(se);
    zsum += lse * lse;
    double stot = 0;
    for (int e = 0; e < c.E; ++e) {
      const double l = o.logits[t * c.E + e];
      score[t * c.E + e] = c.sigmoid ? 1.0 / (1.0 + std::exp(-l)) : std::exp(l - lse);
      stot += score[t * c.E + e];
    }
    for (int e = 0; e < c.E; ++e) o.probs[t * c.E + e] = c.sigmoid ? score[t * c.E + e] / stot : score[t * c.E + e];
    // Sort all experts by (score [+ bias] descending, index ascending) and take the first K.
    std::vector<int> order(c.E);
    std::iota(order.begin(), order.end(), 0);
    auto chosen_by = [&](int e) { return score[t * c.E + e] + (c.bias.empty() ? 0.0 : c.bias[e]); };
    std::sort(order.begin(), order.end(), [&](int a, int b) {
      const double sa = chosen_by(a), sb = chosen_by(b);
      return sa != sb ? sa > sb : a < b;
    });
    double picked = 0;
    for (int j = 0; j < c.K; ++j) picked += score[t * c.E + order[j]];
    for (int j = 0; j < c.K; ++j) {
      o.idx[t * c.K + j] = order[j];
      const double s = score[t * c.E + order[j]];
      o.gates[t * c.K + j] = (c.sigmoid || c.renorm) ? s / picked : s;
      o.routed_count[order[j]]++;
    }
  }
  if (c.gamma > 0) {
    const int cap = int(std::ceil(c.gamma * c.K * T / double(c.E)));
    for (int e = 0; e < c.E; ++e) {
      std::vector<int> slots;  // (t*K + j), in token order
      for (int s = 0; s < T * c.K; ++s)
        if (o.idx[s] == e) slots.push_back(s);
      std::stable_sort(slots.begin(), slots.end(), [&](int a, int b) {
        return score[(a / c.K) * c.E + e] > score[(b / c.K) * c.E + e];
      });
      for (size_t r = cap; r < slots.size(); ++r) o.kept[slots[r]] = false;
    }
  }
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < c.K; ++j) {
      if (!o.kept[t * c.K + j]) continue;
      const int e = o.idx[t * c.K + j];
      o.kept_count[e]++;
      std::vector<double> a(c.F);
      for (int f = 0; f < c.F; ++f) {
        double h1 = 0, h3 = 0;
        for (int i = 0; i < c.D; ++i) {
          h1 += w.w1[(size_t(e) * c.F + f) * c.D + i] * x[t * c.D + i];
          if (c.act == 0) h3 += w.w3[(size_t(e) * c.F + f) * c.D + i] * x[t * c.D + i];
        }
        a[f] = activation(c.act, h1, h3);
      }
      for (int i = 0; i < c.D; ++i) {
        double acc = 0;
        for (int f = 0; f < c.F; ++f) acc += w.w2[(size_t(e) * c.D + i) * c.F + f] * a[f];
        o.y[t * c.D + i] += o.gates[t * c.K + j] * acc;
      }
    }
  double lbl = 0;
  for (int e = 0; e < c.E; ++e) {
    double p = 0;
    for (int t = 0; t < T; ++t) p += o.probs[t * c.E + e];
    lbl += (o.routed_count[e] / double(c.K * T)) * (p / T);
  }
  o.lbl = T > 0 ? c.E * lbl : 0.0;
  o.zloss = T > 0 ? zsum / T : 0.0;
  return o;
}

}  // namespace ref
