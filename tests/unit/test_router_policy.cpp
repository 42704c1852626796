// A router is one policy type that carries its behaviour (router/policy.hpp): this file defines a new,
// stateful router that no library file knows, and the host layer runs it, state, hook and all. The
// router: top-2 softmax routing that skips the experts its state marks (state value -1e30 added to
// their probabilities for the selection only), and whose step hook marks the expert with the most
// routed slots of the step (its counts summed as for BiasBalanced) and clears the others.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moekit/moe_layer.hpp>
#include <random>
#include <span>
#include <vector>

using namespace moekit;

namespace {

struct SkipBusiest : router::TopK<router::Softmax> {
  using Base = router::TopK<router::Softmax>;
  using options = NoOptions;
  static constexpr bool stateful = true;
  static inline int hook_calls = 0;

  SkipBusiest() = default;
  explicit SkipBusiest(const MoeConfig& c) : Base(c) {}
  // The selection: the scores plus the state (the selection bias), then TopK's own.
  template <class S>
  MOEKIT_HD void select(S* sel, int n, int* idx, const S* state) const {
    for (int i = 0; i < n; ++i) sel[i] += state[i];
    Base::select(sel, n, idx, state);
  }
  template <class S>
  static void end_step(std::span<S> state, const std::vector<std::int64_t>& counts, const MoeConfig&) {
    ++hook_calls;
    const auto busiest = std::max_element(counts.begin(), counts.end()) - counts.begin();
    for (std::size_t e = 0; e < state.size(); ++e) state[e] = std::int64_t(e) == busiest ? S(-1e30) : S(0);
  }
};
static_assert(router::RouterPolicy<SkipBusiest>);

using Layer = MoeLayer<backend::Host<float>, SkipBusiest, experts::Ffn<act::SwiGLU>>;

}  // namespace

TEST_CASE("a router policy defined outside the library: its functor, state and step hook run in the layer") {
  MoeConfig c;
  c.d_model = 8, c.d_expert = 4, c.num_ffn_experts = 6, c.top_k = 2;
  Layer layer(c);
  layer.init_params(3);
  const std::int64_t T = 32;
  std::mt19937 g(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(std::size_t(T * c.d_model)), y(x.size());
  for (auto& v : x) v = nd(g);
  const MatrixView<const float> xv(x.data(), {T, c.d_model});
  const MatrixView<float> yv(y.data(), {T, c.d_model});

  REQUIRE(layer.router_state().size() == std::size_t(c.num_experts()));
  layer.forward(xv, yv);
  const std::vector<std::int64_t> before = layer.routed_counts();
  CHECK(layer.step_counts() == before);
  const auto busiest = std::max_element(before.begin(), before.end()) - before.begin();
  REQUIRE(before[std::size_t(busiest)] > 0);

  SkipBusiest::hook_calls = 0;
  layer.end_step();
  CHECK(SkipBusiest::hook_calls == 1);
  for (std::size_t e = 0; e < layer.router_state().size(); ++e)
    CHECK(layer.router_state()[e] == (std::int64_t(e) == busiest ? -1e30f : 0.f));
  for (auto v : layer.step_counts()) CHECK(v == 0);  // a new step

  // The same tokens again: the marked expert is never selected, and the others take its slots.
  layer.forward(xv, yv);
  const std::vector<std::int64_t>& after = layer.routed_counts();
  CHECK(after[std::size_t(busiest)] == 0);
  std::int64_t total = 0;
  for (auto v : after) total += v;
  CHECK(total == T * c.top_k);
  // Gates use the unbiased probabilities of the picked experts (route_token's contract), so the output is
  // the combine over the new picks: check one token against the probabilities directly.
  const auto idx = layer.topk_indices();
  const auto gates = layer.topk_gates();
  const auto probs = layer.probs();
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t j = 0; j < c.top_k; ++j) {
      CHECK(idx(t, j) != busiest);
      CHECK(gates(t, j) == doctest::Approx(probs(t, idx(t, j))));
    }
}
