#pragma once
// Token-choice router math for one token, written once for g++ and nvcc (docs/design.md §2). S is the
// accumulation type (float, or double in the tests). n = N_E experts, k = top_k.
//
// A token's routing, given its logits l [n]:
//   s = score(l)                 softmax p, or sigmoid σ(l) (DeepSeek-V3)
//   idx = select(s)              the router's selection (top-k of s, of s + b, inside the best groups...):
//                                the router policy's select(), outermost wrapper first (router/policy.hpp)
//   g_j = c · s_idx_j / Z        Z = Σ_j s_idx_j when the gates are renormalised, else 1; c the routed
//                                scaling factor (GateRule)
//   P = s (softmax) or s / Σ s (sigmoid): the balance loss's P_i; lse = logsumexp(l): the z-loss's.
// The selection is a constant of the forward: the backward goes through s only.
#include <cmath>

#include "moekit/core/macros.hpp"
#include "moekit/router/score.hpp"

namespace moekit::router {

// Indices of the k largest scores (score_i + bias_i when a bias is given) in descending order; equal
// values keep the lower index first. NaN never beats a number. idx must hold k entries.
template <class S>
MOEKIT_HD void topk_descending(const S* score, int n, int k, int* idx, const S* bias = nullptr) {
  auto value = [&](int i) { return bias ? score[i] + bias[i] : score[i]; };
  int count = 0;
  for (int i = 0; i < n; ++i) {
    const S s = value(i);
    int p = count;
    // Strictly greater moves ahead: ties stay behind the earlier (lower) index.
    while (p > 0 && (s > value(idx[p - 1]) || (value(idx[p - 1]) != value(idx[p - 1]) && s == s))) --p;
    if (p >= k) continue;
    const int last = count < k ? count : k - 1;
    for (int q = last; q > p; --q) idx[q] = idx[q - 1];
    idx[p] = i;
    if (count < k) ++count;
  }
}

// log-sum-exp of n logits, stable.
template <class S>
MOEKIT_HD S logsumexp(const S* l, int n) {
  S m = l[0];
  for (int i = 1; i < n; ++i) m = l[i] > m ? l[i] : m;
  S sum = 0;
  for (int i = 0; i < n; ++i) sum += std::exp(l[i] - m);
  return m + std::log(sum);
}

template <class S>
MOEKIT_HD S sigmoid(S x) {
  return x >= 0 ? S(1) / (S(1) + std::exp(-x)) : std::exp(x) / (S(1) + std::exp(x));
}

// Below every score: what a selection writes over the experts it rules out.
template <class S>
MOEKIT_HD S excluded_score() {
  return S(-HUGE_VAL);
}

// The router score a slot was picked by, which capacity drops by (lowest first): p for softmax, the
// unnormalised s = sigmoid(logit) for sigmoid.
template <class S>
MOEKIT_HD S capacity_score(Softmax, S /*logit*/, S prob) {
  return prob;
}
template <class S>
MOEKIT_HD S capacity_score(Sigmoid, S logit, S /*prob*/) {
  return sigmoid(logit);
}

// How a token's picked scores become its gates: normalised to sum to 1 when `renormalize` (Mixtral,
// Qwen's norm_topk_prob, DeepSeek-V3), then times `scale` (DeepSeek-V3's and LongCat-Flash's
// routed_scaling_factor).
struct GateRule {
  bool renormalize = false;
  double scale = 1.0;
};

// s = the score function of the logits, into s[n]; returns logsumexp(l) (the z-loss's lse).
template <class S>
MOEKIT_HD S token_scores(Softmax, const S* logit, int n, S* s) {
  const S lse = logsumexp(logit, n);
  for (int i = 0; i < n; ++i) s[i] = std::exp(logit[i] - lse);
  return lse;
}
template <class S>
MOEKIT_HD S token_scores(Sigmoid, const S* logit, int n, S* s) {
  for (int i = 0; i < n; ++i) s[i] = sigmoid(logit[i]);
  return logsumexp(logit, n);
}

// gate[j] = c · s[idx[j]] / Z.
template <class S>
MOEKIT_HD void picked_gates(const S* s, const int* idx, int k, GateRule rule, S* gate) {
  S sum = 0;
  for (int j = 0; j < k; ++j) sum += (gate[j] = s[idx[j]]);
  if (rule.renormalize)
    for (int j = 0; j < k; ++j) gate[j] /= sum;
  if (rule.scale != 1.0)
    for (int j = 0; j < k; ++j) gate[j] *= S(rule.scale);
}

// s -> P of the balance loss, in place: p itself (softmax), s / Σ s (sigmoid).
template <class S>
MOEKIT_HD void balance_probs(Softmax, S* /*s*/, int /*n*/) {}
template <class S>
MOEKIT_HD void balance_probs(Sigmoid, S* s, int n) {
  S total = 0;
  for (int i = 0; i < n; ++i) total += s[i];
  for (int i = 0; i < n; ++i) s[i] /= total;
}

// ds[i] += dL/ds_i through the gates, for the picked i (s the scores, g the gates as applied).
template <class S>
MOEKIT_HD void gates_backward(const S* s, const int* idx, int k, GateRule rule, const S* gate, const S* dgate, S* ds) {
  if (rule.renormalize) {
    S picked = 0, dot = 0;
    for (int j = 0; j < k; ++j) {
      picked += s[idx[j]];
      dot += dgate[j] * gate[j];
    }
    for (int j = 0; j < k; ++j) ds[idx[j]] += (S(rule.scale) * dgate[j] - dot) / picked;
  } else {
    for (int j = 0; j < k; ++j) ds[idx[j]] += S(rule.scale) * dgate[j];
  }
}

// Backward of one token. prob[n]: P from the forward; dgate[k]: dL/dgate; dprob[n]: dL/dP (the LBL
// term, the same for every token); zcoef: dL/d(lse) (z-loss). Writes dlogit[n]; ds: scratch of n.
template <class S>
MOEKIT_HD void token_backward(Softmax, const S* /*logit*/, int n, int k, GateRule rule, const S* prob, const int* idx,
                              const S* gate, const S* dgate, const S* dprob, S zcoef, S* ds, S* dlogit) {
  for (int i = 0; i < n; ++i) ds[i] = dprob[i];
  gates_backward(prob, idx, k, rule, gate, dgate, ds);  // s = p = P
  S dot = 0;
  for (int i = 0; i < n; ++i) dot += ds[i] * prob[i];
  // prob is softmax(logit), so the z-loss term zcoef * d(lse)/dl = zcoef * prob folds in here.
  for (int i = 0; i < n; ++i) dlogit[i] = prob[i] * (ds[i] - dot + zcoef);
}
template <class S>
MOEKIT_HD void token_backward(Sigmoid, const S* logit, int n, int k, GateRule rule, const S* prob, const int* idx,
                              const S* gate, const S* dgate, const S* dprob, S zcoef, S* ds, S* dlogit) {
  // P = s / Σ s: dL/ds_i = (dprob_i − Σ_m dprob_m P_m) / Σ s.
  S total = 0, pdot = 0;
  for (int i = 0; i < n; ++i) total += sigmoid(logit[i]), pdot += dprob[i] * prob[i];
  for (int i = 0; i < n; ++i) ds[i] = (dprob[i] - pdot) / total;
  // The gates need s itself; dlogit holds it meanwhile.
  for (int i = 0; i < n; ++i) dlogit[i] = sigmoid(logit[i]);
  gates_backward(dlogit, idx, k, rule, gate, dgate, ds);
  for (int i = 0; i < n; ++i) dlogit[i] = ds[i] * dlogit[i] * (S(1) - dlogit[i]);
  if (zcoef != S(0)) {
    const S lse = logsumexp(logit, n);
    for (int i = 0; i < n; ++i) dlogit[i] += zcoef * std::exp(logit[i] - lse);
  }
}

// The plain token-choice router of one token (top-k of s, plus an optional selection bias: the forms
// the first routers had), kept as the shared reference of the tests: rule {renormalize, 1} for softmax,
// {true, 1} for sigmoid. Writes prob[n] (P), idx[k], gate[k]; returns lse.
template <class S>
MOEKIT_HD S route_token(Softmax, const S* logit, int n, int k, bool renormalize, S* prob, int* idx, S* gate,
                        const S* bias = nullptr) {
  const S lse = token_scores(Softmax{}, logit, n, prob);
  topk_descending(prob, n, k, idx, bias);
  picked_gates(prob, idx, k, GateRule{renormalize, 1.0}, gate);
  return lse;
}
template <class S>
MOEKIT_HD S route_token(Sigmoid, const S* logit, int n, int k, bool /*renormalize*/, S* prob, int* idx, S* gate,
                        const S* bias = nullptr) {
  const S lse = token_scores(Sigmoid{}, logit, n, prob);
  topk_descending(prob, n, k, idx, bias);  // s itself (+ bias)
  picked_gates(prob, idx, k, GateRule{true, 1.0}, gate);
  balance_probs(Sigmoid{}, prob, n);
  return lse;
}
template <class Score, class S>
MOEKIT_HD void route_token_backward(Score, const S* logit, int n, int k, bool renormalize, const S* prob, const int* idx,
                                    const S* gate, const S* dgate, const S* dprob, S zcoef, S* ds, S* dlogit) {
  const GateRule rule{Score::kind == RouterKind::kSigmoid || renormalize, 1.0};
  token_backward(Score{}, logit, n, k, rule, prob, idx, gate, dgate, dprob, zcoef, ds, dlogit);
}

}  // namespace moekit::router
