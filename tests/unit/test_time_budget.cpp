// train::Trainer under a wall-clock budget (TrainerConfig::time_budget_s; bench/step_time/equal_time.sh):
// the run ends after the step that reaches the budget, each step's learning rate is the schedule at
// the fraction of the budget spent before it, and the last step is reported as the final one.
// CosineSchedule::at_progress against values worked out by hand.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <moekit/train/trainer.hpp>
#include <thread>
#include <vector>

using namespace moekit;

namespace {
// One parameter; every micro-batch sleeps so that a step takes a few milliseconds.
struct Sleepy {
  float w = 1.f, g = 0.f;
  train::MicroBatchStats train_micro_batch(std::int64_t, std::int64_t, double scale) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    g += float(scale) * w;
    train::MicroBatchStats s;
    s.loss = 0.5 * double(w) * double(w);
    return s;
  }
  void zero_grad() { g = 0.f; }
  void reduce_gradients() {}
  void after_optimizer_step() {}
  std::vector<Parameter<float>> parameters() { return {{"w", &w, &g, {1}}}; }
};
}  // namespace

TEST_CASE("CosineSchedule::at_progress: the schedule at a fraction of its length") {
  const train::CosineSchedule s{1.0, 0.1, 2, 10};
  CHECK(s.at_progress(0.0) == doctest::Approx(0.5));   // step 0 of the warmup: (0 + 1) / 2
  CHECK(s.at_progress(-3.0) == doctest::Approx(0.5));  // before the start: step 0
  CHECK(s.at_progress(0.15) == doctest::Approx(1.0));  // step floor(1.5) = 1: (1 + 1) / 2
  // Step floor(5.5) = 5: ratio (5 - 2) / 8 = 0.375, 0.1 + 0.9 * 0.5 * (1 + cos(0.375 pi)), cos = 0.3826834.
  CHECK(s.at_progress(0.55) == doctest::Approx(0.7222075));
  CHECK(s.at_progress(1.0) == doctest::Approx(0.1));
  CHECK(s.at_progress(7.0) == doctest::Approx(0.1));
}

TEST_CASE("Trainer with a time budget: stops at the step that reaches it, the schedule over time") {
  Sleepy m;
  train::TrainerConfig c;
  c.steps = 100000, c.accum = 2, c.log_interval = 1;
  c.time_budget_s = 0.08;
  const train::CosineSchedule sched{1e-3, 1e-4, 2000, 100000};  // warmup: the first 2 % of the budget
  train::Trainer<Sleepy> t(m, c, {1e-3, 0.9, 0.95, 1e-8, 0.0}, sched);
  std::vector<double> lr, time_after;
  std::vector<std::int64_t> reported;
  t.on_log([&](const train::IntervalReport& r) {
    lr.push_back(r.lr);
    reported.push_back(r.step);
  });
  t.on_step([&](std::int64_t) { time_after.push_back(t.train_seconds()); });
  CHECK_FALSE(t.out_of_time());
  t.run();
  const std::int64_t n = t.steps_done();
  REQUIRE(n >= 2);
  CHECK(n < 60);  // 4 ms and more a step: about 20 steps, far below the cap
  REQUIRE(std::int64_t(time_after.size()) == n);
  CHECK(t.out_of_time());
  CHECK(time_after[n - 1] >= c.time_budget_s);  // the last step reached the budget,
  CHECK(time_after[n - 2] < c.time_budget_s);   // the one before had not
  REQUIRE(std::int64_t(lr.size()) == n);
  for (std::int64_t i = 0; i < n; ++i) {
    const double before = i == 0 ? 0.0 : time_after[i - 1];
    CHECK(lr[i] == sched.at_progress(before / c.time_budget_s));
  }
  CHECK(lr[n - 1] < lr[1]);  // decayed along the budget
  CHECK(lr[n - 1] < 0.5 * (1e-3 + 1e-4));  // past half way: below the mean of max and min
  CHECK(reported.back() == n);
  t.run();  // spent: nothing more
  CHECK(t.steps_done() == n);

  train::TrainerConfig bad = c;
  for (double b : {-1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    bad.time_budget_s = b;
    CHECK_THROWS_AS(bad.validate(), ConfigError);
  }
}
