// science/flops.hpp against FLOPs worked out by hand (each number below is written out from the
// shapes, not from the code under test), the MoE layer's own count of its expert GEMMs, and train_lm's
// whole-model count against a sum of its layers done here.
#include <doctest/doctest.h>

#include <cstdint>
#include <moekit/moe_layer.hpp>
#include <moekit/science/flops.hpp>
#include <vector>

#include "../../examples/train_lm/model.hpp"

using moekit::science::Flops;
namespace sc = moekit::science;

TEST_CASE("science::linear_flops: 2 m n k forward, twice that backward, once without an input gradient") {
  const Flops f = sc::linear_flops(3, 5, 7);
  CHECK(f.forward == 210.0);  // 2 * 3 * 5 * 7
  CHECK(f.backward == 420.0);
  CHECK(sc::linear_flops(3, 5, 7, false).backward == 210.0);
  CHECK(f.total() == 630.0);
  CHECK_THROWS_AS(sc::linear_flops(-1, 5, 7), moekit::ConfigError);
}

TEST_CASE("science::attention_flops: projections plus q.k and P.V over the causal pairs") {
  // batch 2, seq 4, d_model 8, 2 heads of 4, 1 kv head: 8 rows.
  //   QKV projection to (2 + 2) * 4 = 16 columns: 2 * 8 * 8 * 16 = 2048 forward, 4096 backward
  //   output projection 8 -> 8:                     2 * 8 * 8 * 8  = 1024 forward, 2048 backward
  //   pairs (key <= query): 2 sequences * 2 heads * (1 + 2 + 3 + 4) = 40; q.k and P.V: 2 * 2 * 40 * 4 = 640
  //   forward, 1280 backward.
  const Flops f = sc::attention_flops(2, 4, 8, 2, 1);
  CHECK(f.forward == 2048.0 + 1024.0 + 640.0);
  CHECK(f.backward == 4096.0 + 2048.0 + 1280.0);
  // The pairs counted by brute force at another shape: batch 3, seq 7, 4 heads of 2 (d_model 8), kv 4.
  double pairs = 0;
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j <= i; ++j) pairs += 1;
  const double rows = 21, proj = 2 * rows * 8 * (8 + 16) + 2 * rows * 8 * 8;
  CHECK(sc::attention_flops(3, 7, 8, 4, 4).forward == proj + 2 * (2 * 3 * 4 * pairs * 2));
  CHECK_THROWS_AS(sc::attention_flops(1, 4, 9, 2, 1), moekit::ConfigError);
}

TEST_CASE("science::moe_flops: the 6 T k d d_expert of docs/design.md section 8 (18 with backward) plus the router") {
  // T 10 tokens, d 6, d_expert 4, 5 experts, top-2: 20 slots.
  const Flops f = sc::moe_flops(10, 6, 4, 5, 20);
  CHECK(f.forward == 6.0 * 10 * 2 * 6 * 4 + 2.0 * 10 * 6 * 5);    // 2880 experts + 600 router
  CHECK(f.total() == 18.0 * 10 * 2 * 6 * 4 + 3 * 2.0 * 10 * 6 * 5);  // 8640 + 1800
  const Flops ungated = sc::moe_flops(10, 6, 4, 5, 20, false);
  CHECK(ungated.forward == 4.0 * 20 * 6 * 4 + 600.0);
}

TEST_CASE("science::moe_flops matches a MoE layer's own count of its expert GEMMs") {
  moekit::MoeConfig c;
  c.d_model = 6, c.d_expert = 5, c.num_ffn_experts = 4, c.top_k = 2;
  const std::int64_t T = 9;
  std::vector<double> x(std::size_t(T * c.d_model)), y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.1 * double(i % 7) - 0.3;
  moekit::MoeLayer<moekit::backend::Host<double>, moekit::router::TopK<moekit::router::Softmax>,
                   moekit::experts::Ffn<moekit::act::SwiGLU>>
      layer(c);
  layer.init_params(3);
  layer.forward(moekit::MatrixView<const double>(x.data(), {T, c.d_model}), moekit::MatrixView<double>(y.data(), {T, c.d_model}));
  const Flops f = sc::moe_flops(T, c.d_model, c.d_expert, c.num_experts(), layer.ffn_rows());
  const double router = 2.0 * double(T) * double(c.d_model) * double(c.num_experts());
  CHECK(double(layer.expert_gemm_flops()) == f.forward - router);
}

TEST_CASE("LmConfig::flops: the blocks' attention and MoE layers and the head") {
  LmConfig c;
  c.seq = 16, c.d_model = 32, c.heads = 4, c.kv_heads = 2, c.blocks = 3;
  c.moe.d_expert = 48, c.moe.num_ffn_experts = 8, c.moe.top_k = 2;
  const std::int64_t batch = 5, rows = batch * c.seq;
  // Per block, by hand: hd 8; QKV to (4 + 4) * 8 = 64: 2*80*32*64; output 32 -> 32: 2*80*32*32;
  // pairs 5 * 4 * 16 * 17 / 2 = 2720, q.k and P.V 2 * 2 * 2720 * 8; router 2*80*32*8; experts
  // 3 * 2 * 160 * 32 * 48. Head 2 * 80 * 32 * 256.
  const double block = 2.0 * 80 * 32 * 64 + 2.0 * 80 * 32 * 32 + 2 * 2.0 * 2720 * 8 + 2.0 * 80 * 32 * 8 + 3 * 2.0 * 160 * 32 * 48;
  const double head = 2.0 * rows * 32 * 256;
  const Flops f = c.flops(batch);
  CHECK(f.forward == doctest::Approx(3 * block + head).epsilon(1e-15));
  CHECK(f.backward == doctest::Approx(2 * (3 * block + head)).epsilon(1e-15));
  c.dense = true;  // one expert of top_k * d_expert, top-1: the same expert FLOPs, a 1-column router
  const double dense_block = block - 2.0 * 80 * 32 * 8 + 2.0 * 80 * 32 * 1;
  CHECK(c.flops(batch).forward == doctest::Approx(3 * dense_block + head).epsilon(1e-15));
}

TEST_CASE("science::ffn_flops and moe_flops with MoE++ slots and the gating residual") {
  // Dense SwiGLU FFN, 3 rows, 4 -> 5 -> 4: three products of 2 * 3 * 4 * 5 = 120 each.
  CHECK(sc::ffn_flops(3, 4, 5).forward == 360.0);
  CHECK(sc::ffn_flops(3, 4, 5).backward == 720.0);
  CHECK(sc::ffn_flops(3, 4, 5, false).forward == 240.0);  // GeLU/ReLU: two products
  // 3 tokens, d 4, d_expert 5, 7 experts; 6 FFN slots, 2 constant-expert slots, gating residual:
  //   router          2 * 3 * 4 * 7     = 168
  //   FFN slots       3 * 2 * 6 * 4 * 5 = 720
  //   constant mixes  2 * 2 * 4 * 2     = 32   (W_c [2, d])
  //   W_g             2 * 3 * 7 * 7     = 294  (the previous logits' gradient flows back: x3 in all)
  const Flops f = sc::moe_flops(3, 4, 5, 7, sc::MoeSlots{6, 2}, true, true);
  CHECK(f.forward == 168.0 + 720.0 + 32.0 + 294.0);
  CHECK(f.backward == 2 * (168.0 + 720.0 + 32.0 + 294.0));
  // Zero and copy experts: fewer FFN slots and nothing else.
  CHECK(sc::moe_flops(3, 4, 5, 7, sc::MoeSlots{4, 0}).forward == 168.0 + 480.0);
  CHECK(sc::moe_flops(3, 4, 5, 7, std::int64_t(6)).forward == 168.0 + 720.0);
  CHECK_THROWS_AS(sc::moe_flops(3, 4, 5, 7, sc::MoeSlots{6, -1}), moekit::ConfigError);
}
