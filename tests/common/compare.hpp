#pragma once
// ‖got − ref‖ / ‖ref‖ over all elements, the tolerance measure of every test that compares a backend with
// its oracle. A non-finite element, or a size mismatch, counts as a huge error (never passes).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include <moekit/layer/parameter_table.hpp>

namespace moekit_test {

inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  if (got.size() != ref.size()) return 1e30;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double d = double(got[i]) - double(ref[i]);
    num += std::isfinite(got[i]) ? d * d : 1e30;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

// Calls check(name, got, ref) for each family of two MoeWeights (every parameter's gradient, say); both
// must hold the same families in the same order.
template <class F>
void for_each_weight(const moekit::MoeWeights<float>& got, const moekit::MoeWeights<float>& ref, F&& check) {
  if (got.keys() != ref.keys())
    throw std::logic_error("for_each_weight: families " + got.keys() + " against " + ref.keys());
  for (std::size_t i = 0; i < got.families.size(); ++i) check(got.families[i].key.c_str(), got.families[i].values, ref.families[i].values);
}

// The part of full-size weights that a layer with table t holds (the rest 0), in the same full-size form
// as that layer's weights() / gradients().
inline moekit::MoeWeights<float> restrict_to(const moekit::ParameterTable& t, const moekit::MoeWeights<float>& full) {
  std::vector<float> flat(std::size_t(t.size()));
  t.pack(full, flat.data());
  moekit::MoeWeights<float> out;
  t.unpack(flat.data(), out);
  return out;
}

}  // namespace moekit_test
