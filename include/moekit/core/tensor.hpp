#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "moekit/core/error.hpp"
#include "moekit/core/macros.hpp"

namespace moekit {

// A non-owning view: pointer + shape + strides (in elements), row-major by default.
template <class T, int Rank>
struct TensorView {
  static_assert(Rank >= 1 && Rank <= 4, "TensorView supports ranks 1 to 4");
  T* data = nullptr;
  std::array<std::int64_t, Rank> shape{};
  std::array<std::int64_t, Rank> stride{};

  TensorView() = default;
  TensorView(T* p, std::array<std::int64_t, Rank> s) : data(p), shape(s) {
    std::int64_t st = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      stride[i] = st;
      st *= shape[i];
    }
  }
  TensorView(T* p, std::array<std::int64_t, Rank> s, std::array<std::int64_t, Rank> st)
      : data(p), shape(s), stride(st) {}

  // A view of const elements converts implicitly from a mutable one.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  TensorView(const TensorView<U, Rank>& o) : data(o.data), shape(o.shape), stride(o.stride) {}

  std::int64_t size(int d) const { return shape[d]; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  bool is_contiguous() const {
    std::int64_t st = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      if (shape[i] != 1 && stride[i] != st) return false;
      st *= shape[i];
    }
    return true;
  }
  template <class... I>
  T& operator()(I... idx) const {
    static_assert(sizeof...(I) == Rank, "index count must equal the rank");
    const std::int64_t ii[] = {static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (int d = 0; d < Rank; ++d) off += ii[d] * stride[d];
    return data[off];
  }
  // Row r of a rank-2 view as a pointer (requires unit inner stride).
  T* row(std::int64_t r) const { return data + r * stride[0]; }
};

template <class T>
using MatrixView = TensorView<T, 2>;
template <class T>
using VectorView = TensorView<T, 1>;

inline std::string shape_string(const std::int64_t* s, int rank) {
  std::string r = "[";
  for (int i = 0; i < rank; ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// Throws ShapeError naming the tensor, what it has and what was expected.
template <class T, int Rank>
void check_shape(const TensorView<T, Rank>& v, const char* name,
                 std::array<std::int64_t, Rank> expected, bool need_contiguous = true) {
  if (v.shape != expected)
    throw ShapeError(std::string(name) + " has shape " + shape_string(v.shape.data(), Rank) +
                     ", expected " + shape_string(expected.data(), Rank));
  if (v.numel() > 0 && v.data == nullptr) throw ShapeError(std::string(name) + " is a null view");
  if (need_contiguous && !v.is_contiguous())
    throw ShapeError(std::string(name) + " must be contiguous row-major");
}

}  // namespace moekit
