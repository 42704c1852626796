// science/comm_bytes.hpp against bytes worked out by hand for a small layer: T = 10 tokens per shard,
// d 4, d_expert 6, 4 FFN experts (SwiGLU), top-2, fp32. So R = 20 rows per shard; expert weights
// 4 * 3 * 6 * 4 = 288, router 4 * 4 = 16.
#include <doctest/doctest.h>

#include <moekit/science/comm_bytes.hpp>

namespace sc = moekit::science;

namespace {
sc::CommShape small(std::int64_t tp, std::int64_t ep, std::int64_t dp, bool dtd) {
  sc::CommShape s;
  s.tokens = 10, s.d_model = 4, s.d_expert = 6, s.ffn_experts = 4, s.top_k = 2;
  s.tp = tp, s.ep = ep, s.dp = dp, s.duplicate_token_dropping = dtd;
  return s;
}
}  // namespace

TEST_CASE("science::moe_layer_comm_bytes: hybrid 2.2.3 with duplicate token dropping") {
  const sc::CommBytes b = sc::moe_layer_comm_bytes(small(2, 2, 3, true));
  // Each tp rank dispatches R/tp = 10 rows of 4 floats = 160 B; half leave the rank (ep 2); there and back.
  CHECK(b.forward.all_to_all == doctest::Approx(160.0));
  CHECK(b.backward.all_to_all == doctest::Approx(160.0));
  // Counts: 4 experts * 8 B to 3 other ranks of the tp*ep group = 96; rows: in and back, 10 rows * 16 B * 1.
  CHECK(b.forward.all_gather == doctest::Approx(96.0 + 320.0));
  CHECK(b.backward.all_gather == doctest::Approx(320.0));
  // Partial outputs (and input gradients): 20 rows * 16 B * (1/2).
  CHECK(b.forward.reduce_scatter == doctest::Approx(160.0));
  CHECK(b.backward.reduce_scatter == doctest::Approx(160.0));
  CHECK(b.forward.all_reduce == 0.0);
  // Gradients: the expert shard 288 / 4 = 72 floats over dp 3: 2 * (2/3) * 72 * 4 = 384; the router
  // over all 12 ranks: 2 * (11/12) * 16 * 4 = 117.33.
  CHECK(b.gradients.all_reduce == doctest::Approx(384.0 + 2.0 * 11.0 / 12.0 * 64.0));
  CHECK(b.step().all_to_all == doctest::Approx(320.0));
}

TEST_CASE("science::moe_layer_comm_bytes: without duplicate token dropping the tp group sums rows") {
  const sc::CommBytes b = sc::moe_layer_comm_bytes(small(2, 2, 1, false));
  CHECK(b.forward.all_to_all == doctest::Approx(320.0));  // all 20 rows of 16 B, half leave, there and back
  CHECK(b.forward.all_gather == doctest::Approx(96.0));   // counts only
  CHECK(b.forward.reduce_scatter == 0.0);
  CHECK(b.forward.all_reduce == doctest::Approx(320.0));  // 2 * (1/2) * 20 * 16
  CHECK(b.backward.all_reduce == doctest::Approx(320.0));
  CHECK(b.gradients.all_reduce == doctest::Approx(2.0 * 3.0 / 4.0 * 64.0));  // dp 1: the router only, over 4 ranks
}

TEST_CASE("science::moe_layer_comm_bytes: data parallel moves gradients only; bf16 halves the rows") {
  const sc::CommBytes b = sc::moe_layer_comm_bytes(small(1, 1, 4, true));
  CHECK(b.forward.total() == 0.0);
  CHECK(b.backward.total() == 0.0);
  CHECK(b.gradients.all_reduce == doctest::Approx(2.0 * 0.75 * 288 * 4 + 2.0 * 0.75 * 16 * 4));  // 1728 + 96
  sc::CommShape h = small(1, 4, 1, true);
  const double fp32 = sc::moe_layer_comm_bytes(h).forward.all_to_all;
  CHECK(fp32 == doctest::Approx(2.0 * 320.0 * 0.75));
  h.element_bytes = 2;
  CHECK(sc::moe_layer_comm_bytes(h).forward.all_to_all == doctest::Approx(fp32 / 2));
  h.ffn_slots = 5;  // MoE++: only 5 slots went to FFN experts
  CHECK(sc::moe_layer_comm_bytes(h).forward.all_to_all == doctest::Approx(2.0 * 5 * 8 * 0.75));
  CHECK(sc::dense_gradient_bytes(100, 4) == doctest::Approx(2.0 * 0.75 * 400));
  h.tp = 0;
  CHECK_THROWS_AS(sc::moe_layer_comm_bytes(h), moekit::ConfigError);
}
