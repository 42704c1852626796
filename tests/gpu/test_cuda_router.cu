// backend/cuda/router.cuh against the host: the same route_token math run per token on the host.
// Outputs are poisoned before each launch so an unwritten element fails. fp32: 1e-5 relative
// (‖out − ref‖/‖ref‖); top-k indices and counts exactly equal.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <moekit/backend/cuda/router.cuh>
#include <random>
#include <vector>

#include "../common/compare.hpp"
#include "device_buffer.cuh"

namespace mc = moekit::backend::cuda;

namespace {



template <class Score>
void check_router(int T, int E, int K, bool renorm, unsigned seed) {
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(K);
  CAPTURE(renorm);
  std::mt19937 g(seed);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<float> logits(std::size_t(T) * E), dgate(std::size_t(T) * K), dprob(E);
  for (auto& v : logits) v = nd(g);
  for (auto& v : dgate) v = nd(g);
  for (auto& v : dprob) v = 0.01f * nd(g);
  if (T > 3)  // ties: token 3 has equal logits, so its picks are 0..k-1
    for (int e = 0; e < E; ++e) logits[3 * E + e] = 0.25f;
  const float zscale = 0.002f;

  // Host reference: the shared functors, token by token.
  std::vector<float> prob(logits.size()), gate(dgate.size()), lse(T), dlog(logits.size()), ds(E);
  std::vector<int> idx(dgate.size()), counts(E, 0);
  for (int t = 0; t < T; ++t) {
    lse[t] = moekit::router::route_token(Score{}, &logits[t * E], E, K, renorm, &prob[t * E], &idx[t * K], &gate[t * K]);
    for (int j = 0; j < K; ++j) ++counts[idx[t * K + j]];
    moekit::router::route_token_backward(Score{}, &logits[t * E], E, K, renorm, &prob[t * E], &idx[t * K], &gate[t * K],
                                         &dgate[t * K], dprob.data(), zscale * lse[t], ds.data(), &dlog[t * E]);
  }

  DeviceBuffer<float> d_logits(logits.size()), d_sel(logits.size()), d_prob(prob.size()), d_gate(gate.size()), d_lse(T), d_dgate(dgate.size()),
      d_dprob(E), d_scratch(mc::route_tokens_backward_workspace(T, E) / sizeof(float)), d_dlogits(logits.size());
  DeviceBuffer<int> d_idx(idx.size()), d_counts(E);
  d_logits.upload(logits);
  d_dgate.upload(dgate);
  d_dprob.upload(dprob);
  for (auto* b : {&d_prob, &d_gate, &d_lse, &d_dlogits}) b->poison();
  d_idx.poison();
  d_counts.poison();

  // The router object: top-k with the rule route_token uses (the sigmoid router always renormalises).
  moekit::router::TopK<Score> router;
  router.k = K;
  router.rule = {Score::kind == moekit::RouterKind::kSigmoid || renorm, 1.0};
  mc::RouteParams fp;
  fp.logits = d_logits.p;
  fp.tokens = T;
  fp.experts = E;
  fp.top_k = K;
  fp.sel = d_sel.p;
  fp.prob = d_prob.p;
  fp.idx = d_idx.p;
  fp.gate = d_gate.p;
  fp.lse = d_lse.p;
  fp.counts = d_counts.p;
  MOEKIT_CUDA_CHECK(mc::route_tokens(router, fp, nullptr));
  mc::RouteBackwardParams bp;
  bp.logits = d_logits.p;
  bp.prob = d_prob.p;
  bp.idx = d_idx.p;
  bp.gate = d_gate.p;
  bp.dgate = d_dgate.p;
  bp.dprob = d_dprob.p;
  bp.lse = d_lse.p;
  bp.zscale = zscale;
  bp.tokens = T;
  bp.experts = E;
  bp.top_k = K;
  bp.scratch = d_scratch.p;
  bp.dlogits = d_dlogits.p;
  MOEKIT_CUDA_CHECK(mc::route_tokens_backward(router, bp, nullptr));
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());

  CHECK(d_idx.download() == idx);
  CHECK(d_counts.download() == counts);
  CHECK(moekit_test::rel_err(d_prob.download(), prob) < 1e-5);
  CHECK(moekit_test::rel_err(d_gate.download(), gate) < 1e-5);
  CHECK(moekit_test::rel_err(d_lse.download(), lse) < 1e-5);
  CHECK(moekit_test::rel_err(d_dlogits.download(), dlog) < 1e-5);
}

}  // namespace

TEST_CASE("cuda router: fused softmax/sigmoid top-k forward and backward match the host") {
  for (int T : {1, 37, 1000})
    for (auto [E, K] : {std::pair{8, 2}, std::pair{64, 8}, std::pair{128, 8}})
      for (bool renorm : {false, true}) {
        check_router<moekit::router::Softmax>(T, E, K, renorm, 11u + T + E);
        check_router<moekit::router::Sigmoid>(T, E, K, renorm, 17u + T + E);
      }
}

TEST_CASE("cuda router: invalid shapes are rejected with cudaErrorInvalidValue, not launched") {
  moekit::router::TopK<moekit::router::Softmax> router;
  mc::RouteParams p;
  p.tokens = 4;
  p.experts = 8;
  p.top_k = router.k = 9;  // > experts
  CHECK(mc::route_tokens(router, p, nullptr) == cudaErrorInvalidValue);
  p.top_k = router.k = 2;  // null buffers
  CHECK(mc::route_tokens(router, p, nullptr) == cudaErrorInvalidValue);
}
