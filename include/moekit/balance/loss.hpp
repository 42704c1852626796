#pragma once
// Balance-loss and capacity formulas (docs/design.md §4), host/device.
#include <cmath>
#include <cstdint>

#include "moekit/core/macros.hpp"

namespace moekit::balance {

// LBL = N_E * sum_i eta_i * f_i * P_i with f_i = counts_i / (k * tokens_f), P_i = prob_sum_i / tokens_p.
template <class S>
MOEKIT_HD S load_balancing_loss(const std::int64_t* counts, const S* prob_sum, int n, int k,
                                std::int64_t tokens_f, std::int64_t tokens_p, const S* eta = nullptr) {
  if (tokens_f <= 0 || tokens_p <= 0) return S(0);
  S acc = 0;
  for (int i = 0; i < n; ++i) {
    const S f = S(counts[i]) / (S(k) * S(tokens_f));
    acc += (eta ? eta[i] : S(1)) * f * (prob_sum[i] / S(tokens_p));
  }
  return S(n) * acc;
}

// d LBL / d prob_ti (the same for every token t of the scope): N_E * eta_i * f_i / tokens_p.
template <class S>
MOEKIT_HD S load_balancing_dprob(std::int64_t count_i, int n, int k, std::int64_t tokens_f,
                                 std::int64_t tokens_p, S eta_i = S(1)) {
  if (tokens_f <= 0 || tokens_p <= 0) return S(0);
  return S(n) * eta_i * (S(count_i) / (S(k) * S(tokens_f))) / S(tokens_p);
}

// coef · d LBL / d prob_ti for every expert i (the same for every token t): dprob[n].
template <class S>
void load_balancing_dprob_all(const std::int64_t* counts, int n, int k, std::int64_t tokens_f, std::int64_t tokens_p,
                              const S* eta, S coef, S* dprob) {
  for (int i = 0; i < n; ++i) dprob[i] = coef * load_balancing_dprob<S>(counts[i], n, k, tokens_f, tokens_p, eta[i]);
}

// The sequence scope (DeepSeek-V3 eq. 17-20): `seqs` sequences of `len` tokens, counts and prob_sum
// [seqs, n] (each sequence's routed counts and Σ_t prob[t, i]); LBL = (1/seqs) Σ_b of each sequence's
// loss above.
template <class S>
S sequence_balancing_loss(const std::int64_t* counts, const S* prob_sum, int n, int k, std::int64_t seqs, std::int64_t len,
                          const S* eta) {
  if (seqs <= 0) return S(0);
  S acc = 0;
  for (std::int64_t b = 0; b < seqs; ++b) acc += load_balancing_loss<S>(counts + b * n, prob_sum + b * n, n, k, len, len, eta);
  return acc / S(seqs);
}
// coef · d LBL / d prob_ti for the tokens of each sequence b: dprob [seqs, n] (N_E η_i f_{b,i} / (B·S)).
template <class S>
void sequence_balancing_dprob_all(const std::int64_t* counts, int n, int k, std::int64_t seqs, std::int64_t len, const S* eta, S coef,
                                  S* dprob) {
  for (std::int64_t b = 0; b < seqs; ++b) load_balancing_dprob_all<S>(counts + b * n, n, k, len, len, eta, coef / S(seqs), dprob + b * n);
}

// Slots one expert may take: C = ceil(gamma * k * T / N_E); 0 means dropless (no limit, returns -1).
inline std::int64_t expert_capacity(double gamma, std::int64_t k, std::int64_t tokens, std::int64_t n_experts) {
  if (gamma <= 0.0) return -1;
  return static_cast<std::int64_t>(std::ceil(gamma * double(k) * double(tokens) / double(n_experts)));
}

// Slots per expert with MoE++'s heterogeneous capacities (gamma > 0):
//   C_FFN = ceil(gamma tau k T / (tau N_FFN + N_ZC)), C_ZC = ceil(gamma k T / (tau N_FFN + N_ZC));
// without ZC experts both are ceil(gamma k T / N_FFN). -1 = no limit (dropless).
struct Capacities {
  std::int64_t ffn = -1, zc = -1;
};
inline Capacities expert_capacities(double gamma, double tau, std::int64_t k, std::int64_t tokens, std::int64_t n_ffn,
                                    std::int64_t n_zc) {
  if (gamma <= 0.0) return {};
  if (n_zc == 0) {
    const std::int64_t c = expert_capacity(gamma, k, tokens, n_ffn);
    return {c, c};
  }
  const double denom = tau * double(n_ffn) + double(n_zc);
  return {static_cast<std::int64_t>(std::ceil(gamma * tau * double(k) * double(tokens) / denom)),
          static_cast<std::int64_t>(std::ceil(gamma * double(k) * double(tokens) / denom))};
}

}  // namespace moekit::balance
