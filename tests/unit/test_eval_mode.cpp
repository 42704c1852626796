// An evaluation-mode forward on the host keeps nothing for backward (layer/pipeline.hpp,
// backend/host/layer_ops.hpp): the same output bits as a training forward, none of the buffers only
// backward reads (sizes worked from the shapes; the gradients only once something asks for them),
// and backward after it is refused.
#include <doctest/doctest.h>

#include <cstdint>
#include <moekit/moe_layer.hpp>
#include <stdexcept>
#include <vector>

#include "../common/random.hpp"

using namespace moekit;
using moekit_test::random_vec;

TEST_CASE("evaluation mode: same output, no backward buffers, backward refused until a training forward") {
  using Layer = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  MoeConfig c;
  c.d_model = 16, c.d_expert = 24, c.num_ffn_experts = 4, c.top_k = 2, c.lbl_coef = 0.01;
  const std::int64_t T = 10, d = c.d_model, n = c.num_experts(), k = c.top_k, f = c.d_expert;
  Layer train(c), eval(c);
  train.init_params(2), eval.init_params(2);
  eval.set_training(false);
  const auto x = random_vec(std::size_t(T * d), 8u), dy = random_vec(std::size_t(T * d), 9u);
  std::vector<float> y1(x.size()), y2(x.size()), dx1(x.size()), dx2(x.size());
  const MatrixView<const float> xv(x.data(), {T, d});
  train.forward(xv, MatrixView<float>(y1.data(), {T, d}));
  eval.forward(xv, MatrixView<float>(y2.data(), {T, d}));
  CHECK(y1 == y2);
  // What training keeps in addition: dlogits [T, N], dgate [T, k], the d rows [T·k, d], a [T·k, f].
  const std::size_t extra = sizeof(float) * std::size_t(T * n + T * k + T * k * d + T * k * f);
  CHECK(train.buffer_bytes() - eval.buffer_bytes() == extra);
  // Neither has touched its gradients yet, so neither holds them: the first access allocates them
  // (zeroed), one float per parameter, and only once.
  const std::size_t params = eval.flat_values().size(), before = eval.buffer_bytes();
  CHECK(params > 0);
  CHECK(eval.flat_grads().size() == params);
  CHECK(eval.buffer_bytes() - before == sizeof(float) * params);
  for (float g : eval.flat_grads()) REQUIRE(g == 0.f);
  const float* grads = eval.flat_grads().data();
  eval.forward(xv, MatrixView<float>(y2.data(), {T, d}));
  CHECK(eval.flat_grads().data() == grads);
  CHECK_THROWS_AS(eval.backward(MatrixView<const float>(dy.data(), {T, d}), MatrixView<float>(dx2.data(), {T, d})), std::logic_error);
  eval.set_training(true);
  eval.forward(xv, MatrixView<float>(y2.data(), {T, d}));
  train.backward(MatrixView<const float>(dy.data(), {T, d}), MatrixView<float>(dx1.data(), {T, d}));
  eval.backward(MatrixView<const float>(dy.data(), {T, d}), MatrixView<float>(dx2.data(), {T, d}));
  CHECK(dx1 == dx2);
  CHECK(std::vector<float>(train.flat_grads().begin(), train.flat_grads().end()) ==
        std::vector<float>(eval.flat_grads().begin(), eval.flat_grads().end()));
}
