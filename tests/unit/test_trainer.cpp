// The train_domains example's pieces under test: the whole model's gradient (embedding bag, two
// residual MoE blocks with their aux losses, RMSNorms, LM head, cross-entropy) against central finite
// differences in double, plain and with MoE++ experts + gating residual; global- against micro-batch
// balancing; a short AdamW run that must learn; and the data generator's rules.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <moekit/train/adamw.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../../examples/common/moe_flags.hpp"
#include "../../examples/train_domains/domains.hpp"
#include "../../examples/train_domains/model.hpp"

namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab = 7;
  c.context = 3;
  c.d_model = 4;
  c.d_expert = 3;
  c.experts = 3;
  c.top_k = 2;
  c.blocks = 2;
  c.lbl_coef = 0.2;  // large, so a wrong aux-loss gradient shows
  c.zloss_coef = 0.05;
  return c;
}

// L = CE + sum_l (lbl_coef * LBL_l + zloss_coef * z_l); h = 1e-6; tolerance as in test_nn.cpp:
// |analytic - fd| <= 1e-7 * max(1, |analytic|). Routing must not change under +-h (checked).
// Returns the number of elements checked and the slots routed to zero-computation experts.
std::pair<std::int64_t, std::int64_t> check_model_gradient(const ModelConfig& c, std::uint64_t seed, std::int64_t rows) {
  Model<double> model(c, seed);
  std::mt19937_64 g(3);
  std::vector<std::int32_t> ids(rows * c.context), targets(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < c.context; ++j) ids[r * c.context + j] = std::int32_t(j * c.vocab + std::int64_t(g() % c.vocab));
    targets[r] = std::int32_t(g() % c.vocab);
  }
  auto routing = [&] {
    std::vector<std::int32_t> idx;
    for (std::int64_t l = 0; l < c.blocks; ++l) {
      const auto t = model.moe(l).topk_indices();
      idx.insert(idx.end(), t.data, t.data + rows * c.top_k);
    }
    return idx;
  };
  auto loss = [&] {
    double l = model.forward(ids.data(), targets.data(), rows);
    for (std::int64_t b = 0; b < c.blocks; ++b) l += c.lbl_coef * model.aux(b).lbl + c.zloss_coef * model.aux(b).zloss;
    return l;
  };

  model.zero_grad();
  model.forward(ids.data(), targets.data(), rows, 1.0);
  const auto base_routing = routing();
  std::int64_t zc_slots = 0;
  for (auto e : base_routing) zc_slots += e >= c.experts;
  model.backward(1.0);
  auto params = model.parameters();
  CHECK(params.front().name == "embed.weight");
  CHECK(params.back().name == "lm_head.bias");
  std::int64_t checked = 0;
  for (auto& p : params) {
    INFO("parameter " << p.name);
    const std::vector<double> analytic(p.grad, p.grad + p.numel());
    for (std::int64_t i = 0; i < p.numel(); ++i) {
      const double keep = p.value[i];
      p.value[i] = keep + 1e-6;
      const double up = loss();
      const bool same_up = routing() == base_routing;
      p.value[i] = keep - 1e-6;
      const double down = loss();
      const bool same_down = routing() == base_routing;
      p.value[i] = keep;
      REQUIRE((same_up && same_down));
      const double fd = (up - down) / 2e-6;
      INFO("element " << i << ": analytic " << analytic[i] << " vs finite difference " << fd);
      CHECK(std::abs(analytic[i] - fd) <= 1e-7 * std::max(1.0, std::abs(analytic[i])));
      ++checked;
    }
  }
  return {checked, zc_slots};
}

}  // namespace

TEST_CASE("train_domains model: full gradient matches finite differences (double)") {
  CHECK(check_model_gradient(tiny_config(), 21, 6).first > 300);
}

TEST_CASE("train_domains model: gradient with gating residual and zero/copy/constant experts matches finite differences") {
  // Every MoE++ piece in one model: the second block's router reads the first's logits (W_g gets a
  // gradient, and the first block's router gets one through W_g), tau != 1 weighs the ZC experts in
  // the LBL, and tokens reach zero, copy and constant experts.
  ModelConfig c = tiny_config();
  c.zero_experts = 1;
  c.copy_experts = 1;
  c.constant_experts = 1;
  c.tau = 0.5;
  c.gating_residual = true;
  {
    Model<double> probe(c, 5);
    bool has_residual = false, has_constant = false;
    for (auto& p : probe.parameters()) {
      has_residual = has_residual || p.name == "blocks.1.moe.gate_residual.weight";
      has_constant = has_constant || p.name == "blocks.0.moe.constant.0.v";
    }
    CHECK(has_residual);
    CHECK(has_constant);
  }
  const auto [checked, zc_slots] = check_model_gradient(c, 5, 10);
  CHECK(checked > 400);
  CHECK(zc_slots > 0);  // the ZC experts' paths were exercised
}

TEST_CASE("train_domains model: gradient with the open models' routers and experts matches finite differences") {
  // The trainers reach them through MoeFlags (examples/common/moe_flags.hpp) onto ModelConfig::base.
  SUBCASE("GPT-OSS: router bias, clamped SwiGLU with a limit the activations reach, FFN biases") {
    ModelConfig c = tiny_config();
    MoeFlags f;
    f.router_bias = true, f.renormalize = "true", f.activation = "swiglu_oai", f.swiglu_limit = 0.5, f.ffn_bias = true;
    f.apply(c.base);
    {
      Model<double> probe(c, 7);
      bool has_router_bias = false, has_w2_bias = false;
      for (auto& p : probe.parameters()) {
        has_router_bias = has_router_bias || p.name == "blocks.0.moe.gate.bias";
        has_w2_bias = has_w2_bias || p.name == "blocks.1.moe.experts.2.w2.bias";
      }
      CHECK(has_router_bias);
      CHECK(has_w2_bias);
    }
    CHECK(check_model_gradient(c, 7, 10).first > 400);
  }
  SUBCASE("DeepSeek-V3: sigmoid, groups, scaling") {
    ModelConfig c = tiny_config();
    c.experts = 4;
    MoeFlags f;
    f.router = "sigmoid", f.n_group = 2, f.topk_group = 1, f.group_score = "max", f.routed_scaling_factor = 2.5;
    f.apply(c.base);
    CHECK(check_model_gradient(c, 9, 10).first > 400);
  }
}

namespace {

std::vector<double> all_grads(Model<double>& m) {
  std::vector<double> g;
  for (auto& p : m.parameters()) g.insert(g.end(), p.grad, p.grad + p.numel());
  return g;
}
std::vector<double> all_values(Model<double>& m) {
  std::vector<double> v;
  for (auto& p : m.parameters()) v.insert(v.end(), p.value, p.value + p.numel());
  return v;
}

// A batch of `rows` random windows and targets.
void random_batch(const ModelConfig& c, std::mt19937_64& g, std::int64_t rows, std::vector<std::int32_t>& ids,
                  std::vector<std::int32_t>& targets) {
  ids.resize(rows * c.context);
  targets.resize(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < c.context; ++j) ids[r * c.context + j] = std::int32_t(j * c.vocab + std::int64_t(g() % c.vocab));
    targets[r] = std::int32_t(g() % c.vocab);
  }
}

}  // namespace

TEST_CASE("train_domains model: global- and micro-batch balancing agree with one micro-batch per step") {
  // docs/design.md §4: with one rank and one micro-batch both scopes compute the same f_i. Three AdamW steps
  // with end_step() after each must give the same losses, gradients and weights.
  ModelConfig c = tiny_config();
  c.zero_experts = 1;
  c.copy_experts = 1;
  ModelConfig cg = c;
  cg.global_balance = true;
  Model<double> micro(c, 13), global(cg, 13);
  auto pm = micro.parameters(), pg = global.parameters();
  moekit::train::AdamW<double> om(pm, {}), og(pg, {});
  std::mt19937_64 g(9);
  std::vector<std::int32_t> ids, targets;
  for (int step = 0; step < 3; ++step) {
    random_batch(c, g, 12, ids, targets);
    micro.zero_grad();
    global.zero_grad();
    CHECK(micro.forward(ids.data(), targets.data(), 12, 1.0) == global.forward(ids.data(), targets.data(), 12, 1.0));
    for (std::int64_t l = 0; l < c.blocks; ++l) CHECK(micro.aux(l).lbl == doctest::Approx(global.aux(l).lbl).epsilon(1e-14));
    micro.backward(1.0);
    global.backward(1.0);
    const auto gm = all_grads(micro), gg = all_grads(global);
    REQUIRE(gm.size() == gg.size());
    for (std::size_t i = 0; i < gm.size(); ++i) CHECK(gm[i] == doctest::Approx(gg[i]).epsilon(1e-13).scale(1e-13));
    om.step(1e-2);
    og.step(1e-2);
    micro.end_step();
    global.end_step();
  }
  const auto vm = all_values(micro), vg = all_values(global);
  for (std::size_t i = 0; i < vm.size(); ++i) CHECK(vm[i] == doctest::Approx(vg[i]).epsilon(1e-12).scale(1e-12));
}

TEST_CASE("train_domains model: global-batch LBL takes f from the step's micro-batches, P from the current one") {
  // Reference written here: LBL = N_E * sum_i eta_i * f_i * P_i with f_i = (counts over the micro-batches
  // so far) / (k * their tokens), P_i = mean router probability over the current micro-batch.
  ModelConfig c = tiny_config();
  c.zero_experts = 1;
  c.constant_experts = 1;
  c.tau = 0.25;
  c.global_balance = true;
  Model<double> model(c, 17);
  const std::int64_t n = c.total_experts();
  std::mt19937_64 g(4);
  std::vector<std::int32_t> ids, targets;
  for (int step = 0; step < 2; ++step) {
    std::vector<std::vector<double>> counts(c.blocks, std::vector<double>(n, 0.0));
    std::int64_t tokens = 0;
    for (int micro = 0; micro < 3; ++micro) {
      const std::int64_t rows = 7 + micro;
      random_batch(c, g, rows, ids, targets);
      model.forward(ids.data(), targets.data(), rows, 0.5);
      tokens += rows;
      for (std::int64_t l = 0; l < c.blocks; ++l) {
        const auto& routed = model.moe(l).routed_counts();
        const auto probs = model.moe(l).probs();
        double lbl = 0;
        for (std::int64_t i = 0; i < n; ++i) {
          counts[l][i] += double(routed[i]);
          double p = 0;
          for (std::int64_t t = 0; t < rows; ++t) p += probs(t, i);
          const double eta = i < c.experts ? 1.0 : c.tau;
          lbl += eta * counts[l][i] / double(c.top_k * tokens) * p / double(rows);
        }
        lbl *= double(n);
        INFO("step " << step << ", micro-batch " << micro << ", layer " << l);
        CHECK(model.aux(l).lbl == doctest::Approx(lbl).epsilon(1e-12));
      }
      model.backward(0.5);
    }
    model.end_step();  // next step starts from an empty buffer
  }
}

TEST_CASE("train_domains model: gradients accumulate over micro-batches with grad_scale and aux_scale 1/2") {
  // Two half-weighted backward passes of the same batch give the gradient of one full pass.
  const ModelConfig c = tiny_config();
  Model<double> model(c, 8);
  const std::int64_t rows = 5;
  std::vector<std::int32_t> ids(rows * c.context), targets(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < c.context; ++j) ids[r * c.context + j] = std::int32_t(j * c.vocab + (r * 3 + j) % c.vocab);
    targets[r] = std::int32_t((r * 5) % c.vocab);
  }
  model.zero_grad();
  model.forward(ids.data(), targets.data(), rows, 1.0);
  model.backward(1.0);
  std::vector<double> full;
  for (auto& p : model.parameters()) full.insert(full.end(), p.grad, p.grad + p.numel());
  model.zero_grad();
  for (int m = 0; m < 2; ++m) {
    model.forward(ids.data(), targets.data(), rows, 0.5);
    model.backward(0.5);
  }
  std::size_t at = 0;
  for (auto& p : model.parameters())
    for (std::int64_t i = 0; i < p.numel(); ++i, ++at) CHECK(p.grad[i] == doctest::Approx(full[at]).epsilon(1e-12).scale(1e-12));
}

TEST_CASE("train_domains model: a short AdamW run learns the generated languages") {
  const domains::Rules rules(7);
  const domains::Stream train = domains::generate(rules, 1 << 16, 100);
  const domains::Stream heldout = domains::generate(rules, 4096, 200);
  ModelConfig c;
  c.d_model = 32;
  c.d_expert = 32;
  c.experts = 4;
  c.top_k = 2;
  c.context = 6;
  Model<float> model(c, 7);
  auto params = model.parameters();
  moekit::train::AdamW<float> opt(params, {});
  const moekit::train::CosineSchedule sched{1e-2, 1e-3, 10, 150};
  // Window ids of token i, as main.cpp builds them: slot j holds token i-1-j offset by j * vocab.
  auto window = [&](const domains::Stream& s, std::int64_t i, std::int32_t* ids) {
    for (std::int64_t j = 0; j < c.context; ++j)
      ids[j] = std::int32_t(j * c.vocab) + (i - 1 - j >= 0 ? s.tokens[i - 1 - j] : domains::kSeparator);
  };
  const std::int64_t n_eval = 4096, batch = 256;
  std::vector<std::int32_t> ids(n_eval * c.context), tg(n_eval);
  for (std::int64_t i = 0; i < n_eval; ++i) {
    window(heldout, i, &ids[i * c.context]);
    tg[i] = heldout.tokens[i];
  }
  const double before = model.forward(ids.data(), tg.data(), n_eval);
  moekit::SplitMix64 rng(42);
  std::vector<std::int32_t> bi(batch * c.context), bt(batch);
  for (int step = 0; step < 150; ++step) {
    for (std::int64_t r = 0; r < batch; ++r) {
      const std::int64_t i = std::int64_t(rng.next() % train.tokens.size());
      window(train, i, &bi[r * c.context]);
      bt[r] = train.tokens[i];
    }
    opt.zero_grad();
    model.forward(bi.data(), bt.data(), batch, 1.0);
    model.backward(1.0);
    moekit::train::clip_grad_norm(params, 1.0);
    opt.step(sched(step));
  }
  const double after = model.forward(ids.data(), tg.data(), n_eval);
  const double unigram = domains::unigram_entropy(heldout.tokens);
  INFO("held-out loss before " << before << ", after " << after << ", unigram " << unigram);
  CHECK(before > unigram);   // an untrained model is no better than token frequencies
  CHECK(after < 0.5 * unigram);
}

TEST_CASE("train_domains data: unigram entropy by hand") {
  // Frequencies 1/2, 1/4, 1/4: H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2.
  CHECK(domains::unigram_entropy({1, 1, 2, 3}) == doctest::Approx(1.5 * std::log(2.0)));
  CHECK(domains::unigram_entropy({5, 5, 5}) == doctest::Approx(0.0));
}

TEST_CASE("train_domains data: documents follow their language's rules; streams are seeded") {
  const domains::Rules rules(3);
  const domains::Stream s = domains::generate(rules, 20000, 11);
  REQUIRE(s.tokens.size() == s.domain.size());
  REQUIRE(s.tokens.size() == s.oracle_nll.size());
  CHECK(s.tokens.size() >= 20000);
  CHECK(s.tokens.back() == domains::kSeparator);
  int seen[domains::kNumDomains] = {};
  std::size_t begin = 0;
  for (std::size_t i = 0; i < s.tokens.size(); ++i) {
    CHECK(std::isfinite(s.oracle_nll[i]));
    CHECK(s.oracle_nll[i] >= 0.0f);
    if (s.tokens[i] != domains::kSeparator) continue;
    // One document: [begin, i).
    const int d = s.domain[begin];
    const std::vector<std::int32_t> doc(s.tokens.begin() + std::ptrdiff_t(begin), s.tokens.begin() + std::ptrdiff_t(i));
    CHECK(int(doc.size()) >= domains::kDocMin);
    CHECK(int(doc.size()) <= domains::kDocMax);
    ++seen[d];
    for (std::size_t t = 0; t < doc.size(); ++t) {
      switch (d) {
        case domains::kMarkov: {
          CHECK(doc[t] >= domains::kMarkovLo);
          CHECK(doc[t] < domains::kMarkovLo + domains::kMarkovN);
          if (t >= 2) {
            const auto& nx = rules.markov_next[(doc[t - 2] - domains::kMarkovLo) * domains::kMarkovN + (doc[t - 1] - domains::kMarkovLo)];
            CHECK((doc[t] == nx[0] || doc[t] == nx[1] || doc[t] == nx[2]));
          }
          break;
        }
        case domains::kArith:
          if (t >= 2) CHECK((doc[t] - doc[t - 1] - (doc[t - 1] - doc[t - 2])) % domains::kArithMod == 0);
          break;
        case domains::kCopy:
          if (t >= std::size_t(domains::kCopyPeriod)) CHECK(doc[t] == doc[t - domains::kCopyPeriod]);
          break;
        case domains::kBracket:
          CHECK(doc[t] >= domains::kBracketLo);
          break;
      }
    }
    if (d == domains::kBracket) {  // every closing bracket matches the innermost open one
      std::vector<std::int32_t> stack;
      for (auto x : doc) {
        const std::int32_t kind = x - domains::kBracketLo;
        if (kind < domains::kBracketKinds) {
          stack.push_back(kind);
        } else {
          REQUIRE(!stack.empty());
          CHECK(stack.back() == kind - domains::kBracketKinds);
          stack.pop_back();
        }
        CHECK(int(stack.size()) <= domains::kBracketMaxDepth);
      }
    }
    begin = i + 1;
  }
  for (int d = 0; d < domains::kNumDomains; ++d) CHECK(seen[d] > 50);
  // Same seeds, same stream; another stream seed, another stream under the same rules.
  CHECK(domains::generate(rules, 20000, 11).tokens == s.tokens);
  CHECK(domains::generate(rules, 20000, 12).tokens != s.tokens);
}
