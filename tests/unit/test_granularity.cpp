// Fine-grained experts (Krajewski et al., arXiv 2402.07871; docs/design.md §3): fine_grained_config(base, d_ff,
// E, G, k_base) gives d_expert = d_ff / G, G E FFN experts and top_k = G k_base, so the parameters a token
// activates (and the expert FLOPs per token) stay constant across G.
#include <doctest/doctest.h>

#include <cstdint>
#include <moekit/experts/granularity.hpp>
#include <moekit/moe_layer.hpp>
#include <string>
#include <vector>

using namespace moekit;

TEST_CASE("fine_grained_config: d_ff = 1024, E = 8, k_base = 2, G in {1, 2, 4, 8}") {
  MoeConfig base;
  base.d_model = 64;
  base.router = RouterKind::kSigmoid;
  base.activation = Activation::kSwiGLU;
  base.capacity_factor = 1.25;
  base.lbl_coef = 0.01;
  base.zloss_coef = 0.001;
  base.tau = 0.75;
  // Per token: top_k experts, each with W1, W3 [d_expert, d_model] and W2 [d_model, d_expert] (SwiGLU).
  const std::int64_t active_g1 = 2 * 3 * 64 * 1024;
  struct Expect {
    std::int64_t G, d_expert, n_ffn, top_k;
  };
  for (const Expect e : {Expect{1, 1024, 8, 2}, Expect{2, 512, 16, 4}, Expect{4, 256, 32, 8}, Expect{8, 128, 64, 16}}) {
    CAPTURE(e.G);
    const MoeConfig c = fine_grained_config(base, 1024, 8, e.G, 2);
    CHECK(c.d_expert == e.d_expert);
    CHECK(c.num_ffn_experts == e.n_ffn);
    CHECK(c.top_k == e.top_k);
    CHECK(c.top_k * 3 * c.d_model * c.d_expert == active_g1);
    CHECK(c.num_ffn_experts * 3 * c.d_model * c.d_expert == 8 * 3 * 64 * 1024);  // total FFN parameters too
    // Everything else is the base's.
    CHECK(c.d_model == 64);
    CHECK(c.router == RouterKind::kSigmoid);
    CHECK(c.activation == Activation::kSwiGLU);
    CHECK(c.capacity_factor == 1.25);
    CHECK(c.lbl_coef == 0.01);
    CHECK(c.zloss_coef == 0.001);
    CHECK(c.tau == 0.75);
    CHECK(c.num_zc_experts() == 0);
  }
}

TEST_CASE("fine_grained_config: a bad granularity is a ConfigError naming it") {
  MoeConfig base;
  base.d_model = 64;
  for (std::int64_t G : {0, -2, 3, 6, 7, 2048}) {  // not >= 1, or not a divisor of d_ff = 1024
    CAPTURE(G);
    CHECK_THROWS_AS(fine_grained_config(base, 1024, 8, G, 2), ConfigError);
    try {
      fine_grained_config(base, 1024, 8, G, 2);
    } catch (const ConfigError& err) {
      CHECK(err.field() == "granularity");
      CHECK(std::string(err.what()).find("granularity") != std::string::npos);
    }
  }
}

// Layers built from the derived configs do the same expert work per token (dropless, FFN experts only):
// T tokens x top_k rows, 3 GEMMs of 2 rows d_model d_expert each = 2 T k_base d_model d_ff 3 for every G.
TEST_CASE("fine-grained layers: expert FLOPs per token constant across G") {
  MoeConfig base;
  base.d_model = 4;
  const std::int64_t T = 6, d_ff = 16, E = 2, k_base = 1;
  std::vector<double> x(size_t(T * base.d_model));
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1 * double(i % 7) - 0.3;
  for (std::int64_t G : {1, 2, 4, 8}) {
    CAPTURE(G);
    const MoeConfig c = fine_grained_config(base, d_ff, E, G, k_base);
    MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>> layer(c);
    layer.init_params(5);
    std::vector<double> y(x.size());
    layer.forward(MatrixView<const double>(x.data(), {T, c.d_model}), MatrixView<double>(y.data(), {T, c.d_model}));
    CHECK(layer.ffn_rows() == T * c.top_k);
    CHECK(layer.expert_gemm_flops() == 2 * T * k_base * base.d_model * d_ff * 3);
  }
}
