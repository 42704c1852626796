#pragma once
// Router math for one token, written once for g++ and nvcc (docs/design.md §2). S is the accumulation type
// (float, or double in the tests). n = N_E experts, k = top_k.
#include <cmath>

#include "moekit/core/macros.hpp"
#include "moekit/router/score.hpp"

namespace moekit::router {

// Indices of the k largest scores (score_i + bias_i when a bias is given: router::BiasBalanced) in
// descending order; equal values keep the lower index first. NaN never beats a number. idx must hold
// k entries.
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

// Forward of one token. Writes prob[n] (P of the balance loss), idx[k], gate[k]; returns the
// logsumexp of the logits (for the z-loss). bias (router::BiasBalanced, else null) enters the top-k
// selection only: the gates and P use the unbiased scores.
template <class S>
MOEKIT_HD S route_token(Softmax, const S* logit, int n, int k, bool renormalize, S* prob, int* idx,
                        S* gate, const S* bias = nullptr) {
  const S lse = logsumexp(logit, n);
  for (int i = 0; i < n; ++i) prob[i] = std::exp(logit[i] - lse);
  topk_descending(prob, n, k, idx, bias);
  S sum = 0;
  for (int j = 0; j < k; ++j) sum += (gate[j] = prob[idx[j]]);
  if (renormalize)
    for (int j = 0; j < k; ++j) gate[j] /= sum;
  return lse;
}

// DeepSeek-V3: s = sigmoid(l); picked s normalised to sum to 1; P uses s / sum(s).
// `score` is scratch of n entries.
template <class S>
MOEKIT_HD S route_token(Sigmoid, const S* logit, int n, int k, bool /*renormalize*/, S* prob, int* idx,
                        S* gate, const S* bias = nullptr) {
  S total = 0;
  for (int i = 0; i < n; ++i) total += (prob[i] = sigmoid(logit[i]));
  topk_descending(prob, n, k, idx, bias);  // s itself (+ bias)
  S sum = 0;
  for (int j = 0; j < k; ++j) sum += (gate[j] = prob[idx[j]]);
  for (int j = 0; j < k; ++j) gate[j] /= sum;
  for (int i = 0; i < n; ++i) prob[i] /= total;
  return logsumexp(logit, n);
}

// Backward of one token. dgate[k]: dL/dgate; dprob[n]: dL/dP-contribution per token (the LBL term,
// already divided by T); zcoef: dL/d(lse) (z-loss). Writes dlogit[n]; ds is scratch of n entries.
template <class S>
MOEKIT_HD void route_token_backward(Softmax, const S* /*logit*/, int n, int k, bool renormalize, const S* prob,
                                    const int* idx, const S* gate, const S* dgate, const S* dprob, S zcoef,
                                    S* ds, S* dlogit) {
  for (int i = 0; i < n; ++i) ds[i] = dprob[i];
  if (renormalize) {
    S picked = 0, dot = 0;
    for (int j = 0; j < k; ++j) {
      picked += prob[idx[j]];
      dot += dgate[j] * gate[j];
    }
    for (int j = 0; j < k; ++j) ds[idx[j]] += (dgate[j] - dot) / picked;
  } else {
    for (int j = 0; j < k; ++j) ds[idx[j]] += dgate[j];
  }
  S dot = 0;
  for (int i = 0; i < n; ++i) dot += ds[i] * prob[i];
  // prob is softmax(logit), so the z-loss term zcoef * d(lse)/dl = zcoef * prob folds in here.
  for (int i = 0; i < n; ++i) dlogit[i] = prob[i] * (ds[i] - dot + zcoef);
}

template <class S>
MOEKIT_HD void route_token_backward(Sigmoid, const S* logit, int n, int k, bool /*renormalize*/, const S* prob,
                                    const int* idx, const S* gate, const S* dgate, const S* dprob, S zcoef,
                                    S* ds, S* dlogit) {
  // prob = s / total; the picked s are gate * picked_sum.
  S total = 0;
  for (int i = 0; i < n; ++i) total += (ds[i] = sigmoid(logit[i]));  // ds holds s for now
  S picked = 0, gdot = 0;
  for (int j = 0; j < k; ++j) {
    picked += ds[idx[j]];
    gdot += dgate[j] * gate[j];
  }
  S pdot = 0;
  for (int i = 0; i < n; ++i) pdot += dprob[i] * prob[i];
  for (int i = 0; i < n; ++i) {
    const S s = ds[i];
    dlogit[i] = (dprob[i] - pdot) / total * s * (S(1) - s);
  }
  for (int j = 0; j < k; ++j) {
    const S s = ds[idx[j]];
    dlogit[idx[j]] += (dgate[j] - gdot) / picked * s * (S(1) - s);
  }
  if (zcoef != S(0)) {
    const S lse = logsumexp(logit, n);
    for (int i = 0; i < n; ++i) dlogit[i] += zcoef * std::exp(logit[i] - lse);
  }
}

}  // namespace moekit::router
