// train::Trainer and non-finite steps (train/trainer.hpp): a step whose loss or gradient norm is not
// finite, or whose forward throws NumericError, changes no parameter and no optimizer state, is
// counted in the interval report, and is left out of its averages; max_bad_steps of them in a row
// stop the run with a NumericError naming the step, and a good step in between resets the count.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <moekit/train/trainer.hpp>
#include <set>
#include <string>
#include <vector>

using namespace moekit;

namespace {
// y = w x on fixed data; steps in `nan_loss` report a NaN loss, steps in `nan_grad` a NaN gradient,
// steps in `throws` throw NumericError from the forward (as a layer with non-finite logits does).
struct Toy {
  std::vector<float> w = std::vector<float>(3, 0.5f), g = std::vector<float>(3, 0.f);
  std::set<std::int64_t> nan_loss, nan_grad, throws;
  int end_steps = 0;
  train::MicroBatchStats train_micro_batch(std::int64_t step, std::int64_t, double scale) {
    if (throws.count(step)) throw NumericError("router logits of token 0 are not finite");
    const float x[3] = {1.f, -2.f, 0.5f};
    float p = 0;
    for (int i = 0; i < 3; ++i) p += w[std::size_t(i)] * x[i];
    const float d = p - 1.f;
    for (int i = 0; i < 3; ++i) g[std::size_t(i)] += float(scale) * d * x[i];
    if (nan_grad.count(step)) g[1] = std::numeric_limits<float>::quiet_NaN();
    train::MicroBatchStats s;
    s.loss = nan_loss.count(step) ? std::numeric_limits<double>::infinity() : 0.5 * d * d;
    return s;
  }
  void zero_grad() { std::fill(g.begin(), g.end(), 0.f); }
  void reduce_gradients() {}
  void after_optimizer_step() { ++end_steps; }
  std::vector<Parameter<float>> parameters() { return {{"w", w.data(), g.data(), {3}}}; }
};
train::TrainerConfig config(std::int64_t steps) {
  train::TrainerConfig c;
  c.steps = steps, c.accum = 2, c.log_interval = 4, c.max_bad_steps = 3;
  return c;
}
const train::AdamWConfig kAdam{0.1, 0.9, 0.95, 1e-8, 0.0};
const train::CosineSchedule kSched{0.1, 0.1, 1, 100};
}  // namespace

TEST_CASE("non-finite steps: skipped without touching parameters or moments, counted, left out of the averages") {
  Toy m;
  m.nan_loss = {1}, m.nan_grad = {2}, m.throws = {5};
  train::Trainer<Toy> t(m, config(8), kAdam, kSched);
  std::vector<train::IntervalReport> reports;
  t.on_log([&](const train::IntervalReport& r) { reports.push_back(r); });
  t.step();  // step 0: good
  const std::vector<float> w0 = m.w, m0 = t.optimizer().exp_avg(0), v0 = t.optimizer().exp_avg_sq(0);
  CHECK(t.optimizer().steps_taken() == 1);
  for (int s = 1; s <= 2; ++s) {  // a non-finite loss, then a NaN gradient: nothing moves
    const double norm = t.step();
    CHECK(m.w == w0);
    CHECK(t.optimizer().exp_avg(0) == m0);
    CHECK(t.optimizer().exp_avg_sq(0) == v0);
    CHECK(t.optimizer().steps_taken() == 1);
    if (s == 2) CHECK_FALSE(std::isfinite(norm));
  }
  t.step();  // step 3: good, it moves, and ends the first interval
  CHECK(m.w != w0);
  CHECK(t.optimizer().steps_taken() == 2);
  REQUIRE(reports.size() == 1);
  CHECK(reports[0].bad_steps == 2);
  CHECK(reports[0].bad_steps_total == 2);
  CHECK(std::isfinite(reports[0].loss));  // the average of the good steps' micro-batches only
  CHECK(std::isfinite(reports[0].grad_norm));
  t.run();  // step 5 throws inside the forward: skipped too, the run goes on
  REQUIRE(reports.size() == 2);
  CHECK(reports[1].bad_steps == 1);
  CHECK(reports[1].bad_steps_total == 3);
  CHECK(t.steps_done() == 8);
  CHECK(t.optimizer().steps_taken() == 5);
  CHECK(m.end_steps == 8);  // the per-step hook runs after skipped steps too (GlobalBatch reset)
}

TEST_CASE("non-finite steps: max_bad_steps in a row stop the run, naming the step; a good one in between resets") {
  Toy m;
  m.nan_loss = {2, 3, 5, 6, 7};  // 2, 3 then a good 4: no stop; 5, 6, 7: the third in a row stops
  train::Trainer<Toy> t(m, config(10), kAdam, kSched);
  std::string message;
  try {
    t.run();
  } catch (const NumericError& e) {
    message = e.what();
  }
  CHECK(t.steps_done() == 8);
  CHECK(message.find("step 8: 3 steps in a row with a non-finite loss or gradient norm") != std::string::npos);
  CHECK(message.find("the parameters are those after step 5") != std::string::npos);
  train::TrainerConfig bad = config(4);
  bad.max_bad_steps = 0;
  CHECK_THROWS_AS(bad.validate(), ConfigError);
}
