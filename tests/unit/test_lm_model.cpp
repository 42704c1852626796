// train_lm's model (examples/train_lm/model.hpp): the whole gradient — embedding, attention with
// rotary positions, norms, MoE layers with their aux losses, the head (untied and tied) — against
// central finite differences in double, and the data helpers against values computed by hand.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../../examples/train_lm/model.hpp"
#include "../../examples/train_lm/text_data.hpp"

namespace {

LmConfig tiny_lm() {
  LmConfig c;
  c.seq = 5, c.d_model = 8, c.heads = 2, c.kv_heads = 1, c.blocks = 2;  // grouped-query: one kv head for two
  c.moe.d_expert = 3, c.moe.num_ffn_experts = 3, c.moe.top_k = 2;
  c.moe.lbl_coef = 0.2, c.moe.zloss_coef = 0.05;  // large, so a wrong aux-loss gradient shows
  return c;
}

// L = CE + sum_l (lbl_coef * LBL_l + zloss_coef * z_l); h = 1e-6; |analytic - fd| <= 1e-7 * max(1,
// |analytic|), as test_nn.cpp. Routing must not change under +-h (checked). Returns elements checked.
std::int64_t check_lm_gradient(const LmConfig& c, std::uint64_t seed, std::int64_t batch) {
  LmModel<double> model(c, seed);
  const std::int64_t rows = batch * c.seq;
  std::mt19937_64 g(11);
  std::vector<std::int32_t> inputs(rows), targets(rows);
  for (auto& v : inputs) v = std::int32_t(g() % 256);
  for (auto& v : targets) v = std::int32_t(g() % 256);
  const moekit::MoeConfig& mc = model.layer_config();
  auto routing = [&] {
    std::vector<std::int32_t> idx;
    for (std::int64_t l = 0; l < c.blocks; ++l) {
      const auto t = model.moe(l).topk_indices();
      idx.insert(idx.end(), t.data, t.data + rows * mc.top_k);
    }
    return idx;
  };
  auto loss = [&] {
    model.forward(inputs.data(), batch, c.seq);
    double l = model.loss(targets.data());
    for (std::int64_t b = 0; b < c.blocks; ++b) l += mc.lbl_coef * model.aux(b).lbl + mc.zloss_coef * model.aux(b).zloss;
    return l;
  };
  model.zero_grad();
  model.forward(inputs.data(), batch, c.seq);
  model.loss(targets.data(), 1.0);
  const auto base_routing = routing();
  model.backward(1.0);
  auto params = model.parameters();
  CHECK(params.front().name == "embed.weight");
  CHECK(params.back().name == (c.tie_embeddings ? "norm.weight" : "lm_head.weight"));
  std::int64_t checked = 0;
  for (auto& p : params) {
    INFO("parameter " << p.name);
    const std::vector<double> analytic(p.grad, p.grad + p.numel());
    // Every element of small tensors; a spread of 40 of the embedding's and the head's 256 rows.
    const std::int64_t stride = p.numel() > 400 ? p.numel() / 40 + 1 : 1;
    for (std::int64_t i = 0; i < p.numel(); i += stride) {
      const std::int64_t at = p.numel() > 400 ? (i + std::int64_t(inputs[std::size_t(i) % inputs.size()]) * c.d_model) % p.numel() : i;
      const double keep = p.value[at];
      p.value[at] = keep + 1e-6;
      const double up = loss();
      const bool same_up = routing() == base_routing;
      p.value[at] = keep - 1e-6;
      const double down = loss();
      const bool same_down = routing() == base_routing;
      p.value[at] = keep;
      REQUIRE((same_up && same_down));
      const double fd = (up - down) / 2e-6;
      INFO("element " << at << ": analytic " << analytic[at] << " vs finite difference " << fd);
      CHECK(std::abs(analytic[at] - fd) <= 1e-7 * std::max(1.0, std::abs(analytic[at])));
      ++checked;
    }
  }
  return checked;
}

}  // namespace

TEST_CASE("train_lm model: full gradient matches finite differences (double, GQA, untied head)") {
  CHECK(check_lm_gradient(tiny_lm(), 3, 2) > 500);
}

TEST_CASE("train_lm model: gradient with a tied head, gating residual and zero/copy/constant experts") {
  LmConfig c = tiny_lm();
  c.tie_embeddings = true, c.kv_heads = 2;
  c.moe.gating_residual = true;
  c.moe.num_zero_experts = 1, c.moe.num_copy_experts = 1, c.moe.num_constant_experts = 1, c.moe.tau = 0.5;
  CHECK(check_lm_gradient(c, 4, 2) > 500);
}

TEST_CASE("train_lm model: --dense is one FFN of top_k * d_expert with top-1 routing and no aux losses") {
  LmConfig c = tiny_lm();
  c.dense = true;
  const moekit::MoeConfig mc = c.layer_config();
  CHECK(mc.num_ffn_experts == 1);
  CHECK(mc.top_k == 1);
  CHECK(mc.d_expert == 2 * 3);
  CHECK(mc.lbl_coef == 0.0);
  CHECK(check_lm_gradient(c, 5, 2) > 300);
}

TEST_CASE("train_lm model: causal — changing a later byte leaves earlier logits unchanged") {
  const LmConfig c = tiny_lm();
  LmModel<double> model(c, 6);
  std::vector<std::int32_t> a = {10, 20, 30, 40, 50}, b = a;
  b[3] = 99;
  model.forward(a.data(), 1, c.seq);
  const std::vector<double> la(model.logits().data, model.logits().data + c.seq * 256);
  model.forward(b.data(), 1, c.seq);
  const std::vector<double> lb(model.logits().data, model.logits().data + c.seq * 256);
  CHECK(std::equal(la.begin(), la.begin() + 3 * 256, lb.begin()));      // positions 0..2: exactly the same
  CHECK(!std::equal(la.begin() + 3 * 256, la.end(), lb.begin() + 3 * 256));  // position 3 on: changed
}

TEST_CASE("train_lm data: unigram bits, sequences and the held-out split by hand") {
  CHECK(unigram_bits("aabb") == doctest::Approx(1.0));
  CHECK(unigram_bits("abcd") == doctest::Approx(2.0));
  CHECK(unigram_bits("aaaa") == doctest::Approx(0.0));
  const std::string text = "hello world";
  const std::int64_t starts[2] = {0, 6};
  std::int32_t in[6], tg[6];
  make_sequences(text, starts, 2, 3, in, tg);
  CHECK(in[0] == 'h');
  CHECK(tg[0] == 'e');
  CHECK(in[3] == 'w');
  CHECK(tg[5] == 'l');
  TextSplit part{std::string(10, 'x'), std::vector<std::uint8_t>(10, 0)};
  CHECK(eval_windows(part, 100, 3) == 3);  // 9 predicted bytes need 10
  CHECK(eval_windows(part, 4, 3) == 1);
  CHECK(printable_utf8("a\xC3\xA9\x01") == "a\xC3\xA9?");
  CHECK(printable_utf8("\xC3") == "\xEF\xBF\xBD");
}

TEST_CASE("train_lm data: the embedded corpus is seeded, labelled and in four languages") {
  const auto a = corpus::generate(20000, 7), b = corpus::generate(20000, 7), c = corpus::generate(20000, 8);
  CHECK(a.bytes == b.bytes);
  CHECK(a.bytes != c.bytes);
  REQUIRE(a.domain.size() == a.bytes.size());
  std::vector<int> seen(corpus::kNumDomains, 0);
  for (auto d : a.domain) seen[d] = 1;
  CHECK(std::count(seen.begin(), seen.end(), 1) == corpus::kNumDomains);
  // The sums are right: every "a + b = c" line adds up.
  std::size_t at = 0;
  int checked = 0;
  while ((at = a.bytes.find(" + ", at)) != std::string::npos) {
    const std::size_t line = a.bytes.rfind('\n', at) + 1, end = a.bytes.find('\n', at);
    long x = 0, y = 0, z = 0;
    if (std::sscanf(a.bytes.substr(line, end - line).c_str(), "%ld + %ld = %ld", &x, &y, &z) == 3) {
      CHECK(x + y == z);
      ++checked;
    }
    at = end;
  }
  CHECK(checked > 10);
}
