// train::Trainer: the loop's order and scaling, clipping, the schedule, the intervals, against the same
// steps written out by hand with AdamW and clip_grad_norm.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <moekit/train/trainer.hpp>
#include <string>
#include <vector>

using namespace moekit;

namespace {
// L = 0.5 Σ_i a_i (w_i − c_{micro})², one micro-batch at a time; records the calls.
struct Quadratic {
  std::vector<float> w{1.0f, -2.0f, 3.0f}, g = std::vector<float>(3, 0.0f);
  std::vector<float> a{1.0f, 4.0f, 0.5f};
  std::vector<std::string> calls;
  double scale_seen = 0;
  static float target(std::int64_t step, std::int64_t micro) { return 0.1f * float(step) - 0.3f * float(micro); }
  train::MicroBatchStats train_micro_batch(std::int64_t step, std::int64_t micro, double scale) {
    calls.push_back("micro " + std::to_string(step) + "." + std::to_string(micro));
    scale_seen = scale;
    train::MicroBatchStats s;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const float d = w[i] - target(step, micro);
      s.loss += 0.5 * a[i] * d * d;
      g[i] += float(scale) * a[i] * d;
    }
    s.lbl = {0.5}, s.zloss = {0.25}, s.load = {{3, 1}};
    return s;
  }
  void zero_grad() {
    calls.push_back("zero");
    std::fill(g.begin(), g.end(), 0.0f);
  }
  void reduce_gradients() { calls.push_back("reduce"); }
  void after_optimizer_step() { calls.push_back("after"); }
  std::vector<Parameter<float>> parameters() { return {{"w", w.data(), g.data(), {3}}}; }
};
}  // namespace

TEST_CASE("train::Trainer: the steps of the loop equal the hand-written loop") {
  train::TrainerConfig tc;
  tc.steps = 7, tc.accum = 2, tc.log_interval = 3, tc.eval_interval = 2, tc.max_grad_norm = 0.5;
  tc.tokens_per_micro_batch = 10;
  train::AdamWConfig ac;
  ac.lr = 0.05, ac.weight_decay = 0.1;
  const train::CosineSchedule sched{0.05, 0.005, 2, 7};
  Quadratic m;
  train::Trainer<Quadratic> trainer(m, tc, ac, sched);
  std::vector<train::IntervalReport> logs;
  std::vector<std::int64_t> evals;
  trainer.on_log([&](const train::IntervalReport& r) { logs.push_back(r); });
  trainer.on_eval([&](std::int64_t s) { evals.push_back(s); });
  trainer.run();

  // The same by hand.
  std::vector<float> w{1.0f, -2.0f, 3.0f}, g(3), a{1.0f, 4.0f, 0.5f};
  std::vector<Parameter<float>> ps{{"w", w.data(), g.data(), {3}}};
  train::AdamW<float> opt(ps, ac);
  std::vector<double> norms;
  for (std::int64_t s = 0; s < 7; ++s) {
    std::fill(g.begin(), g.end(), 0.0f);
    for (std::int64_t micro = 0; micro < 2; ++micro)
      for (std::size_t i = 0; i < 3; ++i) g[i] += 0.5f * a[i] * (w[i] - Quadratic::target(s, micro));
    norms.push_back(train::clip_grad_norm(ps, 0.5));
    opt.step(sched(s));
  }
  for (std::size_t i = 0; i < 3; ++i) CHECK(m.w[i] == w[i]);  // bit for bit: the same operations in the same order
  CHECK(trainer.steps_done() == 7);
  CHECK(trainer.optimizer().steps_taken() == 7);
  CHECK(m.scale_seen == 0.5);
  // The order within a step.
  REQUIRE(m.calls.size() >= 5);
  CHECK(m.calls[0] == "zero");
  CHECK(m.calls[1] == "micro 0.0");
  CHECK(m.calls[2] == "micro 0.1");
  CHECK(m.calls[3] == "reduce");
  CHECK(m.calls[4] == "after");
  CHECK(m.calls.size() == 7u * 5u);
  // Reports after steps 3, 6 and the last (7); evaluations every 2 steps but not after the last.
  REQUIRE(logs.size() == 3);
  CHECK(logs[0].step == 3);
  CHECK(logs[1].step == 6);
  CHECK(logs[2].step == 7);
  CHECK(logs[2].steps == 7);
  CHECK(logs[0].grad_norm == doctest::Approx((norms[0] + norms[1] + norms[2]) / 3));
  CHECK(logs[2].grad_norm == doctest::Approx(norms[6]));
  CHECK(logs[0].lbl == std::vector<double>{0.5});
  CHECK(logs[0].expert_load[0][0] == doctest::Approx(0.75));
  CHECK(logs[1].lr == doctest::Approx(sched(5)));
  CHECK(evals == std::vector<std::int64_t>{2, 4, 6});
}

TEST_CASE("train::Trainer: the distributed norm sums the expert slices over the ranks, and stats over the shards") {
  // One rank standing in for two: the expert-slice reduction doubles its part, the stats reduction too.
  std::vector<float> rep{3.0f}, rep_g{3.0f}, ex{0.0f}, ex_g{4.0f};
  std::vector<Parameter<float>> ps{{"r", rep.data(), rep_g.data(), {1}}, {"e", ex.data(), ex_g.data(), {1}, ParamShard::kExpertRows}};
  const double norm = train::clip_grad_norm(ps, 100.0, [](double* v, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) v[i] *= 2;
  });
  CHECK(norm == doctest::Approx(std::sqrt(9.0 + 2 * 16.0)));
  train::TrainerConfig bad;
  bad.max_grad_norm = 0;
  Quadratic m;
  CHECK_THROWS_WITH_AS(train::Trainer<Quadratic>(m, bad, {}, train::CosineSchedule{}), doctest::Contains("max_grad_norm"), ConfigError);
}

namespace {
// The same quadratic with its weights split: w0 stays with the host optimizer, w1..w2 are a parameter
// group (the trainer never sees them as parameters), the second half an expert slice.
struct SplitQuadratic {
  Quadratic q;
  std::unique_ptr<train::HostParameterGroup> group;
  int group_zeroed = 0;
  explicit SplitQuadratic(const train::AdamWConfig& ac)
      : group(std::make_unique<train::HostParameterGroup>(
            std::vector<Parameter<float>>{{"w1", q.w.data() + 1, q.g.data() + 1, {1}},
                                          {"w2", q.w.data() + 2, q.g.data() + 2, {1}, ParamShard::kExpertRows}},
            ac)) {}
  train::MicroBatchStats train_micro_batch(std::int64_t step, std::int64_t micro, double scale) {
    return q.train_micro_batch(step, micro, scale);
  }
  void zero_grad() { q.g[0] = 0.f; }  // the group zeroes its own
  void reduce_gradients() {}
  void after_optimizer_step() {}
  std::vector<Parameter<float>> parameters() { return {{"w0", q.w.data(), q.g.data(), {1}}}; }
  std::vector<train::ParameterGroup*> parameter_groups() { return {group.get()}; }
};
}  // namespace

TEST_CASE("train::Trainer: parameter groups are zeroed, clipped by the one global norm and stepped like host parameters") {
  train::TrainerConfig tc;
  tc.steps = 6, tc.accum = 2, tc.log_interval = 6, tc.max_grad_norm = 0.5;  // clipping is active
  train::AdamWConfig ac;
  ac.lr = 0.05, ac.weight_decay = 0.1;
  const train::CosineSchedule sched{0.05, 0.005, 2, 6};
  Quadratic whole;
  train::Trainer<Quadratic> ref(whole, tc, ac, sched);
  SplitQuadratic split(ac);
  static_assert(train::HasParameterGroups<SplitQuadratic>);
  train::Trainer<SplitQuadratic> trainer(split, tc, ac, sched);
  for (int s = 0; s < tc.steps; ++s) {
    const double n_ref = ref.step(), n = trainer.step();
    CHECK(n == doctest::Approx(n_ref).epsilon(1e-12));  // the same squares, summed in another order
    REQUIRE(n_ref > tc.max_grad_norm);                  // so the factor is applied every step
    for (int i = 0; i < 3; ++i) CHECK(split.q.w[i] == doctest::Approx(whole.w[i]).epsilon(1e-6));
  }
  CHECK(split.group->optimizer().steps_taken() == tc.steps);
  // A non-finite gradient inside a group is named.
  split.q.g[2] = std::nanf("");
  NormSquares sq;
  std::string message;
  try {
    split.group->grad_squares(sq);
  } catch (const NumericError& err) {
    message = err.what();
  }
  CHECK(message.find("gradient of w2 is not finite") != std::string::npos);
}
