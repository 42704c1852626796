// A user of moekit (through add_subdirectory, FetchContent or find_package, named by MOEKIT_CONSUMER_KIND):
// one small MoE layer forward, whose output must be finite.
#include <moekit/moe_layer.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

int main() {
  moekit::MoeConfig c;
  c.d_model = 16;
  c.d_expert = 32;
  c.num_ffn_experts = 4;
  c.top_k = 2;
  moekit::MoeLayer<moekit::backend::Host<float>, moekit::router::TopK<moekit::router::Softmax>,
                   moekit::experts::Ffn<moekit::act::SwiGLU>>
      layer(c);
  layer.init_params(42);
  // y starts as NaN, so an output the layer forgot to write fails the check below.
  std::vector<float> x(8 * 16, 0.5f), y(8 * 16, std::numeric_limits<float>::quiet_NaN());
  layer.forward(moekit::MatrixView<const float>(x.data(), {8, 16}), moekit::MatrixView<float>(y.data(), {8, 16}));
  bool nonzero = false;
  for (float v : y) {
    if (!std::isfinite(v)) {
      std::fprintf(stderr, "moekit consumer (" MOEKIT_CONSUMER_KIND "): non-finite output %f\n", double(v));
      return 1;
    }
    nonzero = nonzero || v != 0.0f;
  }
  if (!nonzero) {
    std::fprintf(stderr, "moekit consumer (" MOEKIT_CONSUMER_KIND "): output is all zeros\n");
    return 1;
  }
  std::printf("moekit consumer (" MOEKIT_CONSUMER_KIND "): forward of 8 tokens is finite, y[0] = %g\n", double(y[0]));
  return 0;
}
