// science/scaling_law.hpp: Eq. 9 and the dense form at the paper's coefficients, the paper's model
// shape and Eq. 10, against numbers worked out by hand (python3, printed with repr):
//   c + (g/G**gamma + a)/N**alpha + b/D**beta at N 1e9, D 1e11, G 8  = 2.9418161011283184
//   c + a/N**alpha + b/D**beta at N 1e9, D 1e11                     = 2.8838162201591633
#include <doctest/doctest.h>

#include <moekit/science/scaling_law.hpp>

namespace sc = moekit::science;

TEST_CASE("science::ScalingLaw: Eq. 9 and the dense form at the paper's coefficients") {
  const sc::ScalingLaw law = sc::ScalingLaw::paper();
  CHECK(law.loss(1e9, 1e11, 8) == doctest::Approx(2.9418161011283184).epsilon(1e-14));
  CHECK(law.dense_loss(1e9, 1e11) == doctest::Approx(2.8838162201591633).epsilon(1e-14));
  // Finer experts lower the loss at equal N and D; the G term vanishes as G grows.
  CHECK(law.loss(1e9, 1e11, 16) < law.loss(1e9, 1e11, 8));
  CHECK(law.loss(1e9, 1e11, 1e12) == doctest::Approx(law.dense_loss(1e9, 1e11)).epsilon(1e-6));
  CHECK_THROWS_AS(law.loss(0, 1e11, 8), moekit::ConfigError);
  CHECK_THROWS_AS(law.loss(1e9, 1e11, 0.5), moekit::ConfigError);
  sc::ScalingLaw bad = law;
  bad.alpha = -0.1;
  CHECK_THROWS_AS(bad.check(), moekit::ConfigError);
}

TEST_CASE("science: the paper's shape (d_model = 64 n_blocks) and Eq. 10") {
  // n_blocks 10: d_model 640, d² = 409600. E = 64: N = 409600 * 516 * 10, active 12 * 409600 * 10.
  const sc::LawShape s = sc::moe_shape(10, 64);
  CHECK(s.d_model == 640.0);
  CHECK(s.total_params == 2113536000.0);
  CHECK(s.active_params == 49152000.0);
  CHECK(sc::dense_shape(10).total_params == 49152000.0);
  // Per token at G 8: (12 * 409600 * 6 + 640 * 64 * 8 * 14) * 10 = 340787200.
  CHECK(sc::moe_training_flops(s, 64, 8, 1.0) == 340787200.0);
  CHECK(sc::moe_training_flops(s, 64, 8, 3e9) == doctest::Approx(3e9 * 340787200.0));
  CHECK(sc::moe_tokens_for_flops(s, 64, 8, 340787200.0 * 7) == doctest::Approx(7.0));
  CHECK_THROWS_AS(sc::moe_tokens_for_flops(s, 64, 8, -1), moekit::ConfigError);
}
