#pragma once
// Random test data, the same in every test binary (library-free: the references use it too).
#include <cstddef>
#include <random>
#include <vector>

namespace moekit_test {

// n values from N(0, scale²).
inline std::vector<double> random_vec(std::size_t n, std::mt19937_64& g, double scale = 1.0) {
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = nd(g);
  return v;
}
// n floats from N(0, 1), from their own generator seeded with `seed`.
inline std::vector<float> random_vec(std::size_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(g);
  return v;
}

// sum_i a[i] b[i] (the loss sum(y * R) of the gradient checks).
inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace moekit_test
