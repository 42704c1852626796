// The launch layer of MoeLayer (layer/pipeline.hpp): can_implement / initialize / run_forward /
// run_backward return a Status for every failure the convenience layer throws for, never throw, and on
// success give the convenience layer's bits.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <moekit/moe_layer.hpp>
#include <string>
#include <vector>

#include "../common/random.hpp"

using namespace moekit;
using moekit_test::random_vec;

namespace {
using Layer = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
MoeConfig config() {
  MoeConfig c;
  c.d_model = 8, c.d_expert = 6, c.num_ffn_experts = 4, c.top_k = 2, c.lbl_coef = 0.01, c.zloss_coef = 0.001;
  return c;
}
}  // namespace

TEST_CASE("launch layer: statuses name each failure, and success equals forward / backward") {
  const MoeConfig c = config();
  std::string why;
  CHECK(Layer::can_implement(c, &why) == Status::kSuccess);
  CHECK(why.empty());
  MoeConfig bad = c;
  bad.top_k = 9;  // > experts
  CHECK(Layer::can_implement(bad, &why) == Status::kInvalidConfig);
  CHECK(why.find("top_k") != std::string::npos);
  bad = c;
  bad.router = RouterKind::kSigmoid;  // not the layer's policy
  CHECK(Layer::can_implement(bad, &why) == Status::kInvalidConfig);
  CHECK(why.find("router") != std::string::npos);

  const std::int64_t T = 7, d = c.d_model;
  Layer conv(c), op(c);
  conv.init_params(3), op.init_params(3);
  std::vector<float> ws(64);
  CHECK(op.initialize(ws.data(), ws.size() * sizeof(float), T) == Status::kInvalidArgument);  // the host owns its buffers
  REQUIRE(op.initialize(nullptr, 0, T) == Status::kSuccess);
  auto x = random_vec(std::size_t(T * d), 4u);
  const auto dy = random_vec(std::size_t(T * d), 5u);
  std::vector<float> y1(x.size()), y2(x.size()), dx1(x.size()), dx2(x.size());
  CHECK(op.run_backward(MatrixView<const float>(dy.data(), {T, d}), MatrixView<float>(dx2.data(), {T, d})) ==
        Status::kInvalidState);
  CHECK(op.last_error().find("before forward") != std::string::npos);
  CHECK(op.run_forward(MatrixView<const float>(x.data(), {T, d - 1}), MatrixView<float>(y2.data(), {T, d})) ==
        Status::kInvalidArgument);
  CHECK(op.last_error().find("ShapeError") != std::string::npos);

  const AuxLosses a1 = conv.forward(MatrixView<const float>(x.data(), {T, d}), MatrixView<float>(y1.data(), {T, d}));
  AuxLosses a2;
  REQUIRE(op.run_forward(MatrixView<const float>(x.data(), {T, d}), MatrixView<float>(y2.data(), {T, d}), {}, {}, &a2) ==
          Status::kSuccess);
  CHECK(op.last_error().empty());
  CHECK(y1 == y2);
  CHECK(a1.lbl == a2.lbl);
  CHECK(a1.zloss == a2.zloss);
  conv.backward(MatrixView<const float>(dy.data(), {T, d}), MatrixView<float>(dx1.data(), {T, d}));
  REQUIRE(op.run_backward(MatrixView<const float>(dy.data(), {T, d}), MatrixView<float>(dx2.data(), {T, d})) ==
          Status::kSuccess);
  CHECK(dx1 == dx2);
  CHECK(conv.flat_grads()[0] == op.flat_grads()[0]);

  x[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK(op.run_forward(MatrixView<const float>(x.data(), {T, d}), MatrixView<float>(y2.data(), {T, d})) ==
        Status::kNumericError);
  CHECK(op.last_error().find("token 0") != std::string::npos);
}

TEST_CASE("status_of: each exception kind maps to its status and its message") {
  std::string m;
  CHECK(status_of([] { throw ConfigError("f", "1", "rule"); }, m) == Status::kInvalidConfig);
  CHECK(m.find("f = 1") != std::string::npos);
  CHECK(status_of([] { throw ShapeError("s"); }, m) == Status::kInvalidArgument);
  CHECK(status_of([] { throw NumericError("n"); }, m) == Status::kNumericError);
  CHECK(status_of([] { throw std::bad_alloc(); }, m) == Status::kOutOfMemory);
  CHECK(status_of([] { throw std::logic_error("l"); }, m) == Status::kInvalidState);
  CHECK(status_of([] { throw std::runtime_error("r"); }, m) == Status::kBackendError);
  CHECK(status_of([] { throw 5; }, m) == Status::kBackendError);
  CHECK(status_of([] {}, m) == Status::kSuccess);
  CHECK(m.empty());
  CHECK(std::string(to_string(Status::kWorkspaceTooSmall)) == "workspace too small");
}
