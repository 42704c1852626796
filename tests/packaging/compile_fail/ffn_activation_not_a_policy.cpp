// expect: experts::Ffn<Act>: Act must be an activation (act::ActivationPolicy
// An expert whose activation is not an activation policy stops the build with a message naming it.
#include <moekit/moe_layer.hpp>

int main() {
  moekit::experts::Ffn<int> expert;
  (void)expert;
}
