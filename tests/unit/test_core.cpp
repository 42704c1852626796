// Config validation, shape errors, tensor views and bf16 rounding.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <moekit/core/bf16.hpp>
#include <moekit/moe_layer.hpp>
#include <string>
#include <vector>

using namespace moekit;

namespace {
MoeConfig valid() {
  MoeConfig c;
  c.d_model = 8;
  c.d_expert = 16;
  c.num_ffn_experts = 4;
  c.top_k = 2;
  return c;
}
// The error must name the field, the value and the rule.
template <class F>
void expect_config_error(F mutate, const std::string& field, const std::string& value, const std::string& rule) {
  MoeConfig c = valid();
  mutate(c);
  try {
    c.validate();
    FAIL("no ConfigError for " << field);
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    CHECK(e.field() == field);
    CHECK(msg.find(field) != std::string::npos);
    CHECK(msg.find(value) != std::string::npos);
    CHECK(msg.find(rule) != std::string::npos);
  }
}
}  // namespace

TEST_CASE("config validation names field, value and rule") {
  CHECK_NOTHROW(valid().validate());
  expect_config_error([](MoeConfig& c) { c.d_model = 0; }, "d_model", "0", "> 0");
  expect_config_error([](MoeConfig& c) { c.d_expert = -3; }, "d_expert", "-3", "> 0");
  expect_config_error([](MoeConfig& c) { c.num_ffn_experts = 0; }, "num_ffn_experts", "0", "> 0");
  expect_config_error([](MoeConfig& c) { c.top_k = 5; }, "top_k", "5", "number of experts = 4");
  expect_config_error([](MoeConfig& c) { c.top_k = 0; }, "top_k", "0", "[1,");
  expect_config_error([](MoeConfig& c) { c.capacity_factor = -0.5; }, "capacity_factor", "-0.5", ">= 0");
  expect_config_error([](MoeConfig& c) { c.capacity_factor = std::nan(""); }, "capacity_factor", "nan", "finite");
  expect_config_error([](MoeConfig& c) { c.lbl_coef = -1; }, "lbl_coef", "-1", ">= 0");
  expect_config_error([](MoeConfig& c) { c.zloss_coef = INFINITY; }, "zloss_coef", "inf", "finite");
  CHECK_THROWS_WITH_AS(parse_activation("tanh"), doctest::Contains("\"tanh\""), ConfigError);
  CHECK_THROWS_WITH_AS(parse_activation("tanh"), doctest::Contains("swiglu"), ConfigError);
  CHECK_THROWS_WITH_AS(parse_router("argmax"), doctest::Contains("router"), ConfigError);
  CHECK(parse_activation("gelu") == Activation::kGeLU);
  CHECK(parse_router("sigmoid") == RouterKind::kSigmoid);
}

TEST_CASE("a layer rejects a config that disagrees with its policies") {
  MoeConfig c = valid();
  c.activation = Activation::kGeLU;
  using L = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  CHECK_THROWS_WITH_AS(L{c}, doctest::Contains("activation"), ConfigError);
  c = valid();
  c.router = RouterKind::kSigmoid;
  CHECK_THROWS_WITH_AS(L{c}, doctest::Contains("router"), ConfigError);
  c = valid();
  c.top_k = 9;
  CHECK_THROWS_AS(L{c}, ConfigError);
}

TEST_CASE("mismatched shapes and non-finite inputs raise clear errors") {
  MoeConfig c = valid();
  MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>> layer(c);
  layer.init_params(1);
  std::vector<float> x(3 * 8, 0.1f), y(3 * 8), small(3 * 7);
  CHECK_THROWS_WITH_AS(layer.forward(MatrixView<const float>(x.data(), {3, 8}), MatrixView<float>(small.data(), {3, 7})),
                       doctest::Contains("y has shape [3, 7], expected [3, 8]"), ShapeError);
  CHECK_THROWS_WITH_AS(layer.forward(MatrixView<const float>(small.data(), {3, 7}), MatrixView<float>(y.data(), {3, 8})),
                       doctest::Contains("x has shape [3, 7]"), ShapeError);
  // Strided (non-contiguous) view.
  MatrixView<const float> strided(x.data(), {3, 4}, {8, 2});
  CHECK_THROWS_AS(layer.forward(strided, MatrixView<float>(y.data(), {3, 4})), ShapeError);
  CHECK_THROWS_WITH_AS(layer.backward(MatrixView<const float>(x.data(), {3, 8}), MatrixView<float>(y.data(), {3, 8})),
                       doctest::Contains("before forward"), std::logic_error);
  x[8 + 3] = std::nanf("");
  CHECK_THROWS_WITH_AS(layer.forward(MatrixView<const float>(x.data(), {3, 8}), MatrixView<float>(y.data(), {3, 8})),
                       doctest::Contains("token 1"), NumericError);
  x[8 + 3] = 0.1f;
  layer.forward(MatrixView<const float>(x.data(), {3, 8}), MatrixView<float>(y.data(), {3, 8}));
  CHECK_THROWS_WITH_AS(layer.backward(MatrixView<const float>(x.data(), {2, 8}), MatrixView<float>(y.data(), {3, 8})),
                       doctest::Contains("dy has shape [2, 8], expected [3, 8]"), ShapeError);
}

TEST_CASE("tensor views: strides, contiguity, element access") {
  std::vector<int> buf(24);
  for (int i = 0; i < 24; ++i) buf[i] = i;
  TensorView<int, 3> v(buf.data(), {2, 3, 4});
  CHECK(v.stride[0] == 12);
  CHECK(v.stride[1] == 4);
  CHECK(v.stride[2] == 1);
  CHECK(v(1, 2, 3) == 23);
  CHECK(v.numel() == 24);
  CHECK(v.is_contiguous());
  TensorView<int, 2> col(buf.data() + 1, {6, 1}, {4, 1});  // a column of a [6,4] matrix
  CHECK(col(5, 0) == 21);
  CHECK(col.is_contiguous() == false);
  TensorView<const int, 3> cv = v;  // mutable -> const conversion
  CHECK(cv(0, 1, 1) == 5);
}

TEST_CASE("bf16: round to nearest even, specials preserved") {
  auto bits = [](float f) { return bf16(f).bits; };
  auto f32 = [](std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  CHECK(bits(1.0f) == 0x3F80);
  CHECK(bits(-2.0f) == 0xC000);
  CHECK(bits(f32(0x3F808000)) == 0x3F80);  // exactly halfway, even below: round down
  CHECK(bits(f32(0x3F818000)) == 0x3F82);  // exactly halfway, odd below: round up to even
  CHECK(bits(f32(0x3F808001)) == 0x3F81);  // just above halfway: round up
  CHECK(bits(f32(0x3F807FFF)) == 0x3F80);  // just below halfway: round down
  CHECK(bits(std::numeric_limits<float>::infinity()) == 0x7F80);
  CHECK(bits(f32(0x7F7FFFFF)) == 0x7F80);  // FLT_MAX rounds to inf
  CHECK(std::isnan(float(bf16(std::nanf("")))));
  CHECK(std::isnan(float(bf16(f32(0x7F800001)))));  // signalling NaN whose payload is in the low bits
  CHECK(float(bf16(3.140625f)) == 3.140625f);        // exactly representable
  CHECK(bf16::to_float(0x4049) == 3.140625f);
}
