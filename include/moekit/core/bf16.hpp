#pragma once
#include <cstdint>
#include <cstring>

#include "moekit/core/macros.hpp"

namespace moekit {

// bfloat16 storage type for the host: conversion from float rounds to nearest even, NaN stays NaN.
// (The CUDA backend uses __nv_bfloat16; both have the same bit layout.)
struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  explicit bf16(float f) : bits(from_float(f)) {}
  explicit operator float() const { return to_float(bits); }

  static std::uint16_t from_float(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0)
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    const std::uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // round to nearest, ties to even
    return static_cast<std::uint16_t>(u >> 16);
  }
  static float to_float(std::uint16_t b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static bf16 from_bits(std::uint16_t b) {
    bf16 r;
    r.bits = b;
    return r;
  }
};

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }

}  // namespace moekit
