// moekit-layer: the reference harness (docs/harness.md). All logic lives in harness.hpp so the unit
// tests can run it in-process.
#include "harness.hpp"

int main(int argc, char** argv) { return moekit_layer::run_harness(argc, argv); }
