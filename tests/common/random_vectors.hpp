#pragma once
// Random test vectors and their dot product (the loss sum(y * R) of the gradient checks).
#include <cstddef>
#include <random>
#include <vector>

namespace moekit_test {

inline std::vector<double> randn(std::size_t n, std::mt19937_64& g, double scale = 1.0) {
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = nd(g);
  return v;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace moekit_test
