// Links moekit::science: science/planner.hpp calls NLopt (BOBYQA), so NLopt's header and library must come
// with the target. One planner step with the paper's law; its Table 2 puts the 1e21-FLOP optimum near
// 37 blocks, so a finite loss and a depth in (10, 100) show that NLopt ran.
#include <cmath>
#include <cstdio>

#include <moekit/science/planner.hpp>

int main() {
  const auto law = moekit::science::ScalingLaw::paper();
  const moekit::science::PlanPoint p = moekit::science::plan_at_granularity(law, 1e21, 64, 16);
  std::printf("moekit::science probe: G 16, %.2f blocks, loss %.5f\n", p.shape.n_blocks, p.loss);
  return std::isfinite(p.loss) && p.shape.n_blocks > 10 && p.shape.n_blocks < 100 ? 0 : 1;
}
