// The parameter table (layer/parameter_table.hpp) built from the families the policies declare
// (router/policy.hpp, experts/policy.hpp): names, order, shapes, shards and flat offsets worked by hand.
#include <doctest/doctest.h>

#include <cstdint>
#include <moekit/layer/parameter_table.hpp>
#include <moekit/router/bias_balanced.hpp>
#include <moekit/router/policy.hpp>
#include <moekit/experts/policy.hpp>
#include <string>
#include <vector>

using namespace moekit;

namespace {
MoeConfig config() {
  MoeConfig c;
  c.d_model = 4, c.d_expert = 6, c.num_ffn_experts = 2, c.num_constant_experts = 1, c.top_k = 1;
  c.gating_residual = true;
  return c;
}
struct NoWeightRouter : router::TopK<router::Softmax> {
  static void declare_parameters(ParamDecls&, const MoeConfig&) {}
};
}  // namespace

TEST_CASE("ParameterTable::of: the policies' families, named and laid out once") {
  using Router = router::GatingResidual<router::TopK<router::Softmax>>;
  using Experts = experts::Set<experts::Ffn<act::SwiGLU>, experts::Constant>;
  const ParameterTable t = ParameterTable::of<Router, Experts>(config());
  struct Want {
    std::string name;
    std::vector<std::int64_t> shape;
    std::int64_t offset;
  };
  // router 3·4 = 12; [w1; w3] per expert 12·4 = 48; w2 per expert 4·6 = 24; wc 2·4; v 4; W_g 3·3.
  const std::vector<Want> want = {
      {"gate.weight", {3, 4}, 0},           {"experts.0.w1.weight", {6, 4}, 12}, {"experts.0.w2.weight", {4, 6}, 108},
      {"experts.0.w3.weight", {6, 4}, 36},  {"experts.1.w1.weight", {6, 4}, 60}, {"experts.1.w2.weight", {4, 6}, 132},
      {"experts.1.w3.weight", {6, 4}, 84},  {"constant.0.wc.weight", {2, 4}, 156}, {"constant.0.v", {4}, 164},
      {"gate_residual.weight", {3, 3}, 168}};
  REQUIRE(t.specs().size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    CAPTURE(want[i].name);
    CHECK(t.specs()[i].name == want[i].name);
    CHECK(t.specs()[i].local_shape == want[i].shape);
    CHECK(t.specs()[i].offset == want[i].offset);
  }
  CHECK(t.size() == 177);

  // The same experts under BiasBalanced<TopK> (no W_g: its state is not a parameter) and ungated GeLU.
  MoeConfig c = config();
  c.gating_residual = false, c.num_constant_experts = 0;
  const ParameterTable u = ParameterTable::of<router::BiasBalanced<router::TopK<router::Sigmoid>>, experts::Ffn<act::GeLU>>(c);
  std::vector<std::string> names;
  for (const auto& s : u.specs()) names.push_back(s.name);
  CHECK(names == std::vector<std::string>{"gate.weight", "experts.0.w1.weight", "experts.0.w2.weight", "experts.1.w1.weight",
                                          "experts.1.w2.weight"});
  CHECK(u.size() == 2 * 4 + 2 * (6 * 4 + 4 * 6));

  // A tp 2 x ep 2 grid: rank (t 1, e 1) holds expert 1, hidden units [3, 6), rows split for w1, columns for w2.
  c.num_ffn_experts = 2, c.tp = 2, c.ep = 2, c.dp = 1;
  const ParameterTable s = ParameterTable::of<router::TopK<router::Softmax>, experts::Ffn<act::GeLU>>(c, ParallelGrid::of(2, 2, 1, 3));
  CHECK(s.first_expert() == 1);
  CHECK(s.local_experts() == 1);
  CHECK(s.find("experts.1.w1.weight").local_shape == std::vector<std::int64_t>{3, 4});
  CHECK(s.find("experts.1.w1.weight").shard == ParamShard::kExpertRows);
  CHECK(s.find("experts.1.w2.weight").local_shape == std::vector<std::int64_t>{4, 3});
  CHECK(s.find("experts.1.w2.weight").shard == ParamShard::kExpertCols);
  CHECK_THROWS_AS(s.find("experts.0.w1.weight"), ShapeError);
}

TEST_CASE("ParameterTable::of: families the config needs but the policies do not declare are a ConfigError") {
  MoeConfig c = config();
  c.gating_residual = false;
  CHECK_THROWS_AS((ParameterTable::of<router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>(c)), ConfigError);  // constant experts
  c.num_constant_experts = 0;
  CHECK_THROWS_AS((ParameterTable::of<NoWeightRouter, experts::Ffn<act::SwiGLU>>(c)), ConfigError);
  CHECK_NOTHROW((ParameterTable::of<router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>(c)));
}
