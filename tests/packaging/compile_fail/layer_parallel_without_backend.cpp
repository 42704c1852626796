// expect: no implementation for this Backend/Parallel combination
// A parallel policy that no backend implements stops the build with a message naming the combination.
#include <moekit/moe_layer.hpp>

struct UnknownParallel {  // satisfies the concept, but no backend knows it
  static constexpr bool distributed = true;
};

int main() {
  moekit::MoeConfig c;
  moekit::MoeLayer<moekit::backend::Host<float>, moekit::router::TopK<moekit::router::Softmax>,
                   moekit::experts::Ffn<moekit::act::SwiGLU>, moekit::balance::MicroBatch, UnknownParallel>
      layer(c);
}
