#pragma once
// ‖got − ref‖ / ‖ref‖ over all elements, the tolerance measure of every test that compares a backend with
// its oracle. A non-finite element, or a size mismatch, counts as a huge error (never passes).
#include <algorithm>
#include <cmath>
#include <vector>

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

}  // namespace moekit_test
