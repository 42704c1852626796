// The moekit-layer harness, run in-process: its outputs against an independent double-precision
// reference written here (loops, no library code), and its gradients against finite differences of that
// reference (bad input: test_harness_errors.cpp). The reference covers MoE++ (arXiv 2410.07348) too:
// zero, copy and constant experts, tau, its capacities, the gating residual.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "harness_case.hpp"

using namespace moekit_test::harness;

namespace {

struct Ref {
  std::vector<double> y, logits, gates;
  std::vector<int> idx, counts, routed;
  std::vector<int> taken;            // expert choice: [T, N_E] 1 where expert e took token t
  std::vector<double> choice_gates;  // expert choice: [T, N_E] its gate, else 0
  double lbl = 0, zloss = 0, loss = 0, min_gap = 1e9;
};

// docs/design.md §2-§4 written out directly for one token at a time, in double.
Ref reference(const Case& c, const Tensors& t) {
  const int T = c.T, D = c.D, F = c.F, N = c.N, K = c.K, NE = c.NE(), NZC = c.Z + c.C + c.Q;
  const auto &x = t.at("x"), &dy = t.at("dy"), &wg = t.at("gate.weight");
  Ref r;
  r.y.assign(T * D, 0.0);
  r.logits.assign(T * NE, 0.0);
  r.gates.assign(T * K, 0.0);
  r.idx.assign(T * K, 0);
  r.routed.assign(NE, 0);
  std::vector<double> score(T * NE), P(T * NE);
  for (int tk = 0; tk < T; ++tk) {
    double* l = &r.logits[tk * NE];
    for (int i = 0; i < NE; ++i) {
      for (int d = 0; d < D; ++d) l[i] += wg[i * D + d] * x[tk * D + d];
      if (c.residual)  // MoE++ gating residual: + W_g prev_logits
        for (int j = 0; j < NE; ++j) l[i] += t.at("gate_residual.weight")[i * NE + j] * t.at("prev_logits")[tk * NE + j];
      if (c.router_bias) l[i] += t.at("gate.bias")[i];  // GPT-OSS: + b
    }
    const double m = *std::max_element(l, l + NE);
    double sum = 0, ssum = 0;
    for (int i = 0; i < NE; ++i) sum += std::exp(l[i] - m);
    const double lse = m + std::log(sum);
    r.zloss += lse * lse / T;
    for (int i = 0; i < NE; ++i) {
      score[tk * NE + i] = c.router == "softmax" ? std::exp(l[i] - lse) : 1.0 / (1.0 + std::exp(-l[i]));
      ssum += score[tk * NE + i];
    }
    for (int i = 0; i < NE; ++i) P[tk * NE + i] = c.router == "softmax" ? score[tk * NE + i] : score[tk * NE + i] / ssum;
    if (c.expert_choice) continue;  // the experts choose, below
    if (!c.replay.empty()) {  // router replay: the record's experts, -1 slots empty; gates by the router's rule
      double picked = 0;
      for (int j = 0; j < K; ++j) {
        const int e = int(t.at("replay.indices")[tk * K + j]);
        r.idx[tk * K + j] = e;
        if (e >= 0) picked += (r.gates[tk * K + j] = score[tk * NE + e]), ++r.routed[e];
      }
      if (c.renorm || (c.router == "sigmoid" && !c.no_renorm))
        for (int j = 0; j < K; ++j) r.gates[tk * K + j] /= picked;
      for (int j = 0; j < K; ++j) r.gates[tk * K + j] *= c.scale;
      continue;
    }
    // The selection ranks score + bias (router::BiasBalanced); the gates below use the score alone.
    auto chosen = [&](int i) { return score[tk * NE + i] + (c.bias ? t.at("gate.e_score_correction_bias")[i] : 0.0); };
    std::vector<int> order;  // the candidates: every expert, or those of the topk_group best groups
    if (c.n_group > 0) {
      const int size = NE / c.n_group;
      std::vector<double> gscore(c.n_group);
      for (int g = 0; g < c.n_group; ++g) {
        std::vector<double> v;
        for (int i = g * size; i < (g + 1) * size; ++i) v.push_back(chosen(i));
        std::sort(v.rbegin(), v.rend());
        gscore[g] = c.group_score == "max" ? v[0] : v[0] + v[1];
      }
      std::vector<int> groups(c.n_group);
      std::iota(groups.begin(), groups.end(), 0);
      std::stable_sort(groups.begin(), groups.end(), [&](int a, int b) { return gscore[a] > gscore[b]; });
      r.min_gap = std::min(r.min_gap, gscore[groups[c.topk_group - 1]] - gscore[groups[c.topk_group]]);
      for (int j = 0; j < c.topk_group; ++j)
        for (int i = groups[j] * size; i < (groups[j] + 1) * size; ++i) order.push_back(i);
    } else {
      order.resize(NE);
      std::iota(order.begin(), order.end(), 0);
    }
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return chosen(a) > chosen(b) || (chosen(a) == chosen(b) && a < b); });
    if (K < int(order.size())) r.min_gap = std::min(r.min_gap, chosen(order[K - 1]) - chosen(order[K]));
    double picked = 0;
    for (int j = 0; j < K; ++j) {
      r.idx[tk * K + j] = order[j];
      picked += (r.gates[tk * K + j] = score[tk * NE + order[j]]);
      ++r.routed[order[j]];
    }
    // Renormalised: softmax when asked, sigmoid unless told not to; then the routed scaling factor.
    if (c.renorm || (c.router == "sigmoid" && !c.no_renorm))
      for (int j = 0; j < K; ++j) r.gates[tk * K + j] /= picked;
    for (int j = 0; j < K; ++j) r.gates[tk * K + j] *= c.scale;
  }
  // The slots: (token, expert, gate). Token choice: t·K + j. Expert choice (Zhou et al.): expert e takes
  // the C_e tokens of highest score (earlier token first on ties), C_e its kind's capacity below capped
  // at T; the slots by token, then expert, each gate c · p[t, e].
  std::vector<int> slot_token, slot_expert;
  std::vector<double> slot_gate;
  for (int s = 0; s < T * K; ++s) slot_token.push_back(s / K), slot_expert.push_back(r.idx[s]), slot_gate.push_back(r.gates[s]);
  if (c.expert_choice) {
    const double g = c.capacity, denom = c.tau * N + NZC;
    const int cap_ffn = std::min(T, int(std::ceil(NZC == 0 ? g * K * T / NE : g * c.tau * K * T / denom)));
    const int cap_zc = std::min(T, int(std::ceil(NZC == 0 ? g * K * T / NE : g * K * T / denom)));
    r.taken.assign(T * NE, 0), r.choice_gates.assign(T * NE, 0.0);
    for (int e = 0; e < NE; ++e) {
      std::vector<int> tokens(T);
      std::iota(tokens.begin(), tokens.end(), 0);
      std::stable_sort(tokens.begin(), tokens.end(), [&](int a, int b) { return score[a * NE + e] > score[b * NE + e]; });
      const int cap = e < N ? cap_ffn : cap_zc;
      if (cap < T) r.min_gap = std::min(r.min_gap, score[tokens[cap - 1] * NE + e] - score[tokens[cap] * NE + e]);
      for (int q = 0; q < cap; ++q) r.taken[tokens[q] * NE + e] = 1;
      r.routed[e] = cap;
    }
    slot_token.clear(), slot_expert.clear(), slot_gate.clear();
    for (int tk = 0; tk < T; ++tk)
      for (int e = 0; e < NE; ++e)
        if (r.taken[tk * NE + e]) {
          r.choice_gates[tk * NE + e] = c.scale * score[tk * NE + e];
          slot_token.push_back(tk), slot_expert.push_back(e), slot_gate.push_back(r.choice_gates[tk * NE + e]);
        }
  }
  const int slots = int(slot_token.size());
  // Capacity: each expert keeps its C highest-scoring slots (earlier token first on ties), with MoE++'s
  // C_FFN and C_ZC when there are zero-computation experts.
  std::vector<bool> kept(slots, true);
  for (int s = 0; s < slots; ++s) kept[s] = slot_expert[s] >= 0;  // a replayed record's -1 slots
  if (c.capacity > 0 && !c.expert_choice) {
    const double g = c.capacity, denom = c.tau * N + NZC;
    const int cap_ffn = int(std::ceil(NZC == 0 ? g * K * T / NE : g * c.tau * K * T / denom));
    const int cap_zc = int(std::ceil(NZC == 0 ? g * K * T / NE : g * K * T / denom));
    for (int e = 0; e < NE; ++e) {
      std::vector<int> slots;
      for (int s = 0; s < T * K; ++s)
        if (r.idx[s] == e) slots.push_back(s);
      std::stable_sort(slots.begin(), slots.end(),
                       [&](int a, int b) { return score[(a / K) * NE + e] > score[(b / K) * NE + e]; });
      for (std::size_t q = std::size_t(e < N ? cap_ffn : cap_zc); q < slots.size(); ++q) kept[slots[q]] = false;
    }
  }
  r.counts.assign(NE, 0);
  for (int s = 0; s < slots; ++s) {
    if (!kept[s]) continue;
    const int tk = slot_token[s], e = slot_expert[s];
    const double* xt = &x[tk * D];
    ++r.counts[e];
    std::vector<double> o(D, 0.0);  // E_e(x_t)
    if (e < N) {
      const auto& w1 = t.at("experts." + std::to_string(e) + ".w1.weight");
      const auto& w2 = t.at("experts." + std::to_string(e) + ".w2.weight");
      const std::string pre = "experts." + std::to_string(e) + ".";
      std::vector<double> a(F);
      for (int f = 0; f < F; ++f) {
        double h1 = c.ffn_bias ? t.at(pre + "w1.bias")[f] : 0.0, h3 = c.ffn_bias && c.gated() ? t.at(pre + "w3.bias")[f] : 0.0;
        for (int d = 0; d < D; ++d) h1 += w1[f * D + d] * xt[d];
        if (c.gated()) {
          const auto& w3 = t.at(pre + "w3.weight");
          for (int d = 0; d < D; ++d) h3 += w3[f * D + d] * xt[d];
        }
        if (c.act == "swiglu") {
          a[f] = h1 / (1.0 + std::exp(-h1)) * h3;
        } else if (c.act == "swiglu_oai") {  // GPT-OSS: (clamp(up) + 1) · g · sigmoid(alpha g), g = min(gate, limit)
          const double alpha = c.swiglu_alpha > 0 ? c.swiglu_alpha : 1.702, lim = c.swiglu_limit > 0 ? c.swiglu_limit : 7.0;
          const double g = std::min(h1, lim), u = std::max(-lim, std::min(h3, lim));
          a[f] = (u + 1.0) * g / (1.0 + std::exp(-alpha * g));
        } else if (c.act == "gelu") {
          a[f] = 0.5 * h1 * (1.0 + std::erf(h1 / std::sqrt(2.0)));
        } else {
          a[f] = std::max(h1, 0.0);
        }
      }
      for (int d = 0; d < D; ++d) {
        if (c.ffn_bias) o[d] = t.at(pre + "w2.bias")[d];
        for (int f = 0; f < F; ++f) o[d] += w2[d * F + f] * a[f];
      }
    } else if (e < N + c.Z) {
      // zero expert: E(x) = 0
    } else if (e < N + c.Z + c.C) {
      std::copy(xt, xt + D, o.begin());  // copy expert: E(x) = x
    } else {  // constant expert: a1 x + a2 v, [a1, a2] = softmax(Wc x)
      const std::string pre = "constant." + std::to_string(e - N - c.Z - c.C) + ".";
      const auto &wc = t.at(pre + "wc.weight"), &v = t.at(pre + "v");
      double z1 = 0, z2 = 0;
      for (int d = 0; d < D; ++d) z1 += wc[d] * xt[d], z2 += wc[D + d] * xt[d];
      const double a1 = 1.0 / (1.0 + std::exp(z2 - z1)), a2 = 1.0 - a1;
      for (int d = 0; d < D; ++d) o[d] = a1 * xt[d] + a2 * v[d];
    }
    for (int d = 0; d < D; ++d) r.y[tk * D + d] += slot_gate[s] * o[d];
  }
  // Shared experts: every token, + σ_t · W2s (silu(W1s x) ⊙ W3s x), σ_t = sigmoid(w_sg · x_t) or 1;
  // never scaled by the routed scaling factor.
  if (c.shared > 0) {
    const int W = c.shared_width();
    const auto &s1 = t.at("shared_experts.w1.weight"), &s2 = t.at("shared_experts.w2.weight"), &s3 = t.at("shared_experts.w3.weight");
    for (int tk = 0; tk < T; ++tk) {
      const double* xt = &x[tk * D];
      double z = 0;
      if (c.shared_gate)
        for (int d = 0; d < D; ++d) z += t.at("shared_expert_gate.weight")[d] * xt[d];
      const double sigma = c.shared_gate ? 1.0 / (1.0 + std::exp(-z)) : 1.0;
      std::vector<double> a(W);
      for (int f = 0; f < W; ++f) {
        double h1 = 0, h3 = 0;
        for (int d = 0; d < D; ++d) h1 += s1[f * D + d] * xt[d], h3 += s3[f * D + d] * xt[d];
        a[f] = h1 / (1.0 + std::exp(-h1)) * h3;
      }
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int f = 0; f < W; ++f) o += s2[d * W + f] * a[f];
        r.y[tk * D + d] += sigma * o;
      }
    }
  }
  // MoE++ LBL (Switch's when tau = 1): N_E sum eta_i f_i P_i, f from the routed (pre-capacity) counts,
  // P the mean router probability, eta_i = 1 for FFN experts and tau for the others. The sequence
  // scope (DeepSeek-V3): the same over each sequence of seq_len tokens, averaged over the sequences.
  const int S = c.seq_len > 0 ? c.seq_len : T, B = T / S;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < NE; ++i) {
      double p = 0, f = 0;
      for (int tk = b * S; tk < (b + 1) * S; ++tk) {
        p += P[tk * NE + i] / S;
        if (!c.expert_choice)
          for (int j = 0; j < K; ++j) f += r.idx[tk * K + j] == i ? 1.0 / (K * S) : 0.0;
      }
      if (c.expert_choice) f = double(r.routed[i]) / (K * T);  // the C_e; one sequence
      r.lbl += NE * (i < N ? 1.0 : c.tau) * f * p / B;
    }
  for (int i = 0; i < T * D; ++i) r.loss += r.y[i] * dy[i];
  r.loss += c.lbl * r.lbl + c.z * r.zloss;
  return r;
}

std::vector<Case> cases() {
  Case a;  // softmax top-2 swiglu, dropless
  Case b;
  b.name = "softmax top-2 gelu renormalised";
  b.act = "gelu", b.renorm = true, b.lbl = 0.1, b.z = 0.0;
  Case c;
  c.name = "sigmoid top-2 relu with capacity 0.75";
  c.router = "sigmoid", c.act = "relu", c.capacity = 0.75;
  Case d;
  d.name = "softmax top-3 swiglu with capacity 1.0";
  d.K = 3, d.capacity = 1.0, d.z = 0.01;
  // MoE++. C_FFN = ceil(1.25 * 0.5 * 2 * 10 / (0.5 * 3 + 4)) = 3, C_ZC = ceil(1.25 * 2 * 10 / 5.5) = 5 (the
  // plain ceil(gamma k T / N_E) = 4 would keep 4 of expert 0's 4 slots; here FFN slots are dropped).
  Case e;
  e.name = "MoE++ softmax top-2 swiglu, 3 FFN + zero + copy + 2 constant, tau 0.5, capacity 1.25";
  e.T = 10, e.N = 3, e.Z = 1, e.C = 1, e.Q = 2, e.tau = 0.5, e.capacity = 1.25, e.lbl = 0.1;
  Case f;
  f.name = "MoE++ sigmoid top-3 gelu with gating residual, 4 FFN + zero + 2 copy + constant, tau 1.5";
  f.router = "sigmoid", f.act = "gelu", f.K = 3, f.Z = 1, f.C = 2, f.Q = 1, f.tau = 1.5, f.residual = true;
  f.lbl = 0.05, f.z = 0.01, f.seed = 3;  // seed 3: every expert gets a slot
  Case g;
  g.name = "MoE++ softmax top-2 relu renormalised with gating residual, 2 FFN + zero + copy + constant, capacity 1.0";
  g.act = "relu", g.renorm = true, g.T = 9, g.N = 2, g.Z = g.C = g.Q = 1, g.tau = 2.0, g.capacity = 1.0;
  g.residual = true;  // C_FFN = ceil(2 * 18 / 7) = 6, C_ZC = ceil(18 / 7) = 3 (plain: 4): the zero expert drops
  Case h;
  h.name = "sigmoid top-2 swiglu with gating residual, FFN experts only";
  h.router = "sigmoid", h.residual = true, h.z = 0.01;
  Case i;
  i.name = "expert bias (aux-loss-free balancing): softmax top-2 swiglu renormalised, lbl 0";
  i.bias = true, i.renorm = true, i.lbl = 0.0, i.rate = 0.01;
  Case j;
  j.name = "expert bias: sigmoid top-2 gelu with gating residual";
  j.bias = true, j.router = "sigmoid", j.act = "gelu", j.residual = true, j.seed = 5;
  // The routers of today's open models (docs/design.md §2).
  Case k;
  k.name = "sigmoid top-2 swiglu, gates not renormalised, routed scaling 1.5";
  k.router = "sigmoid", k.no_renorm = true, k.scale = 1.5;
  Case l;
  l.name = "DeepSeek-V3 router: sigmoid, expert bias, 4 groups by top-2 sum, 2 kept, top-3, scaling 2.5";
  l.router = "sigmoid", l.bias = true, l.N = 8, l.K = 3, l.n_group = 4, l.topk_group = 2, l.scale = 2.5, l.lbl = 0.0, l.T = 8;
  Case m;
  m.name = "DeepSeek-V2 router: softmax renormalised, 4 groups by max, 2 kept";
  m.N = 8, m.n_group = 4, m.topk_group = 2, m.group_score = "max", m.renorm = true, m.T = 8;
  Case n;
  n.name = "GPT-OSS router: softmax with gate.bias, renormalised";
  n.router_bias = true, n.renorm = true;
  // The experts of today's open models (docs/design.md §3).
  Case o;
  o.name = "GPT-OSS: softmax with gate.bias, renormalised; clamped SwiGLU with biases (alpha 1.5, limit 0.4)";
  o.router_bias = true, o.renorm = true, o.act = "swiglu_oai", o.ffn_bias = true, o.swiglu_alpha = 1.5, o.swiglu_limit = 0.4;
  Case p;
  p.name = "clamped SwiGLU at GPT-OSS's defaults, sigmoid top-2 with capacity 1.0";
  p.router = "sigmoid", p.act = "swiglu_oai", p.capacity = 1.0;
  Case q;
  q.name = "MoE++ gelu with FFN biases: 3 FFN + zero + copy + constant";
  q.act = "gelu", q.ffn_bias = true, q.N = 3, q.Z = q.C = q.Q = 1, q.T = 9;
  Case r;  // shared experts (docs/design.md §3)
  r.name = "DeepSeek: sigmoid top-2 scaled 2.5, two shared experts of d_expert at weight 1";
  r.router = "sigmoid", r.scale = 2.5, r.shared = 2;
  Case s;
  s.name = "Qwen2-MoE: softmax top-2 renormalised with capacity 0.5, one gated shared expert of width 7";
  s.renorm = true, s.capacity = 0.5, s.shared = 1, s.d_shared = 7, s.shared_gate = true;
  Case u;
  u.name = "MoE++ relu with a gated shared expert: 3 FFN + zero + copy + constant";
  u.act = "relu", u.N = 3, u.Z = u.C = u.Q = 1, u.T = 9, u.shared = 1, u.d_shared = 3, u.shared_gate = true;
  Case v;  // the balance loss's sequence scope (docs/design.md §4)
  v.name = "DeepSeek-V3's sequence-wise balance: sigmoid top-2, 3 sequences of 4, lbl 0.3";
  v.router = "sigmoid", v.T = 12, v.seq_len = 4, v.lbl = 0.3;
  Case w;
  w.name = "sequence-wise balance with MoE++ experts (eta = tau), 2 sequences of 5, capacity 1.0";
  w.T = 10, w.seq_len = 5, w.N = 3, w.Z = w.C = w.Q = 1, w.tau = 0.5, w.capacity = 1.0, w.lbl = 0.3, w.act = "gelu";
  Case x;  // expert-choice routing (docs/design.md §2)
  x.name = "expert choice: softmax, 4 experts take ceil(1.5 · 2 · 9 / 4) = 7 of 9 tokens each, scaling 1.3";
  x.expert_choice = true, x.T = 9, x.capacity = 1.5, x.lbl = 0.0, x.scale = 1.3;
  Case y;
  y.name = "expert choice with MoE++ experts (C_FFN 3, C_ZC 5 of 10) and a gated shared expert";
  y.expert_choice = true, y.T = 10, y.N = 3, y.Z = y.C = y.Q = 1, y.tau = 0.5, y.capacity = 1.0, y.lbl = 0.0;
  y.shared = 1, y.d_shared = 3, y.shared_gate = true, y.act = "gelu";
  Case z;  // router replay (docs/design.md §2)
  z.name = "router replay: softmax top-2 renormalised, a record with -1 slots (token 3 has none), capacity 1.0";
  z.renorm = true, z.capacity = 1.0, z.replay = {3, 1, 0, -1, 2, 1, -1, -1, 1, 0, 3, 2};
  Case zz;
  zz.name = "router replay: sigmoid top-3 scaled 2.0 with MoE++ experts and expert bias (ignored by the record)";
  zz.router = "sigmoid", zz.K = 3, zz.scale = 2.0, zz.N = 3, zz.Z = zz.C = zz.Q = 1, zz.bias = true, zz.lbl = 0.0, zz.T = 5;
  zz.replay = {0, 4, 5, 3, -1, 1, 2, 0, 5, -1, -1, 4, 1, 2, 3};
  return {a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, u, v, w, x, y, z, zz};
}

}  // namespace

TEST_CASE("moekit-layer: outputs match an independent double reference") {
  for (const Case& c : cases()) {
    const std::string name = c.name;
    CAPTURE(name);
    const Harness h(c);
    const Tensors in = c.inputs();
    const Ref ref = reference(c, in);
    REQUIRE(ref.min_gap > 1e-4);  // no near-ties in top-k, so the routing is unambiguous
    // Every kind of expert the case has does work, so each one's forward and backward is checked.
    for (const auto& [first, count] : {std::pair{0, c.N}, {c.N, c.Z}, {c.N + c.Z, c.C}, {c.N + c.Z + c.C, c.Q}})
      if (count > 0) CHECK(std::accumulate(ref.counts.begin() + first, ref.counts.begin() + first + count, 0) > 0);

    const Run r = h.run();
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    CHECK(r.err.empty());
    const auto f = moekit::io::read_safetensors(h.out);
    std::set<std::string> expected{"y", "dx", "logits", "expert.counts", "aux.lbl", "aux.zloss"};
    for (const char* o : c.expert_choice ? std::vector<const char*>{"choice.taken", "choice.gates"}
                                         : std::vector<const char*>{"topk.indices", "topk.gates"})
      expected.insert(o);
    for (const auto& p : c.params()) expected.insert("grad." + p);
    if (c.residual) expected.insert("grad.prev_logits");
    if (c.bias) expected.insert("expert_bias.update");
    const auto names = f.names();
    CHECK(std::set<std::string>(names.begin(), names.end()) == expected);
    CHECK(f.metadata().at("format") == "moekit-layer");
    CHECK(nlohmann::json::parse(f.metadata().at("config")) == c.config());

    const std::int64_t T = c.T, D = c.D, N = c.NE(), K = c.K;
    CHECK(rel_error(f.get_f32("y", {T, D}), ref.y) < 1e-5);
    CHECK(rel_error(f.get_f32("logits", {T, N}), ref.logits) < 1e-5);
    if (c.expert_choice) {
      CHECK(rel_error(f.get_f32("choice.gates", {T, N}), ref.choice_gates) < 1e-5);
      const auto taken = f.get_i32("choice.taken", {T, N});
      CHECK(std::vector<int>(taken.begin(), taken.end()) == ref.taken);
      CHECK(*std::min_element(ref.taken.begin(), ref.taken.end()) == 0);  // some pair not taken
    } else {
      CHECK(rel_error(f.get_f32("topk.gates", {T, K}), ref.gates) < 1e-5);
      const auto idx = f.get_i32("topk.indices", {T, K});
      CHECK(std::vector<int>(idx.begin(), idx.end()) == ref.idx);
    }
    const auto counts = f.get_i32("expert.counts", {N});
    CHECK(std::vector<int>(counts.begin(), counts.end()) == ref.counts);
    CHECK(f.get_f32("aux.lbl", {1})[0] == doctest::Approx(ref.lbl).epsilon(1e-5));
    CHECK(f.get_f32("aux.zloss", {1})[0] == doctest::Approx(ref.zloss).epsilon(1e-5));
    if (c.capacity > 0 && !c.expert_choice) CHECK(std::accumulate(ref.counts.begin(), ref.counts.end(), 0) < c.T * c.K);  // some drops
    if (c.bias) {
      // The update this forward's routed counts apply: rate · sign(mean − c_i), worked out here.
      const auto upd = f.get_f32("expert_bias.update", {N});
      const double mean = double(std::accumulate(ref.routed.begin(), ref.routed.end(), 0)) / double(N);
      for (int e = 0; e < N; ++e) {
        const double want = ref.routed[e] < mean ? c.rate : ref.routed[e] > mean ? -c.rate : 0.0;
        CHECK(double(upd[e]) == doctest::Approx(want));
      }
      Case plain = c;  // and the bias changed some selection
      plain.bias = false;
      Tensors no_bias = in;
      no_bias.erase("gate.e_score_correction_bias");
      if (c.replay.empty()) CHECK(reference(plain, no_bias).idx != ref.idx);  // a replayed record ignores it
    }

    // Gradients of L = sum(y * dy) + lbl_coef * LBL + zloss_coef * zloss by central differences of the
    // reference (f_i is piecewise constant, so this is also "f carries no gradient").
    std::vector<std::pair<std::string, std::string>> wrt{{"x", "dx"}};
    if (c.residual) wrt.push_back({"prev_logits", "grad.prev_logits"});
    for (const auto& p : c.params()) wrt.push_back({p, "grad." + p});
    for (const auto& [name, grad_name] : wrt) {
      CAPTURE(grad_name);
      std::vector<double> fd(in.at(name).size());
      Tensors t = in;
      for (std::size_t i = 0; i < fd.size(); ++i) {
        const double h0 = t[name][i], step = 1e-6;
        t[name][i] = h0 + step;
        const double up = reference(c, t).loss;
        t[name][i] = h0 - step;
        const double down = reference(c, t).loss;
        t[name][i] = h0;
        fd[i] = (up - down) / (2 * step);
      }
      CHECK(rel_error(f.get_f32(grad_name, c.shapes().at(name)), fd) < 1e-4);
    }
    // Only the three inputs and the output are left in the folder: no temporary files.
    std::set<std::string> files;
    for (const auto& e : fs::directory_iterator(h.dir)) files.insert(e.path().filename().string());
    CHECK(files == std::set<std::string>{"cfg.json", "in.safetensors", "out.safetensors"});
  }
}
