#pragma once
// The tensors of a checkpoint (train/checkpoint.hpp) and how one rank's part of each maps onto the full
// tensor the files hold: a rank holds a whole tensor or one slice of it along one dimension (an expert's
// tp slice: rows of w1/w3, columns of w2). The same runs serve writing (slices gathered into the full
// tensor) and loading (the full tensor cut to whatever slice the loading rank holds, resharding).
// Checksums: XXH3-64 of the full tensor's little-endian bytes, as 16 hex digits.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "moekit/core/error.hpp"
#include "moekit/io/safetensors.hpp"

namespace moekit::train {

// A host fp32 tensor that a checkpoint saves from, and loads into, in place.
struct CheckpointTensor {
  std::string name;
  std::vector<std::int64_t> shape;  // the full tensor, as the files hold it
  float* data = nullptr;            // this rank's part of it: the whole tensor, or its slice
  // A slice: this rank holds [slice_begin, slice_begin + slice_size) along dimension slice_dim, and the
  // other ranks of CheckpointRanks::slices hold the rest. -1: the whole tensor.
  int slice_dim = -1;
  std::int64_t slice_begin = 0, slice_size = 0;
  // This rank writes the full tensor: exactly one rank of the world does for each tensor (for a
  // sliced one, a rank of its slice group, after gathering the slices).
  bool writer = true;

  std::vector<std::int64_t> local_shape() const {
    std::vector<std::int64_t> s = shape;
    if (slice_dim >= 0) s[std::size_t(slice_dim)] = slice_size;
    return s;
  }
  std::int64_t numel() const {  // of this rank's part
    std::int64_t n = 1;
    for (auto s : local_shape()) n *= s;
    return n;
  }
  std::int64_t full_numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

// XXH3-64 of bytes, as 16 lower-case hex digits.
inline std::string checksum_hex(std::span<const std::uint8_t> bytes) {
  const XXH64_hash_t h = XXH3_64bits(bytes.data(), bytes.size());
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

namespace detail {

// Calls run(full_offset, part_offset, count) for each contiguous run of the part of `t` this rank
// holds (elements; row-major): outer index o of the dimensions before slice_dim, then the slice.
template <class F>
void for_each_slice_run(const CheckpointTensor& t, F&& run) {
  if (t.slice_dim < 0) {
    run(std::int64_t(0), std::int64_t(0), t.full_numel());
    return;
  }
  std::int64_t outer = 1, inner = 1;
  for (int i = 0; i < t.slice_dim; ++i) outer *= t.shape[std::size_t(i)];
  for (std::size_t i = std::size_t(t.slice_dim) + 1; i < t.shape.size(); ++i) inner *= t.shape[i];
  const std::int64_t dim = t.shape[std::size_t(t.slice_dim)];
  for (std::int64_t o = 0; o < outer; ++o) run((o * dim + t.slice_begin) * inner, o * t.slice_size * inner, t.slice_size * inner);
}

// The slice must lie inside the tensor: a caller's mistake otherwise (ShapeError naming the tensor).
inline void check_slice(const CheckpointTensor& t) {
  if (t.slice_dim < 0) return;
  if (std::size_t(t.slice_dim) >= t.shape.size() || t.slice_begin < 0 || t.slice_size < 0 ||
      t.slice_begin + t.slice_size > t.shape[std::size_t(t.slice_dim)])
    throw ShapeError("checkpoint tensor '" + t.name + "': slice [" + std::to_string(t.slice_begin) + ", " +
                     std::to_string(t.slice_begin + t.slice_size) + ") of dimension " + std::to_string(t.slice_dim) +
                     " is outside its shape " + io::detail::shape_str(t.shape));
}

// part -> its place in the full tensor, and back.
inline void place_part(const CheckpointTensor& t, const float* part, float* full) {
  for_each_slice_run(t, [&](std::int64_t f, std::int64_t p, std::int64_t n) { std::copy_n(part + p, n, full + f); });
}
inline void take_part(const CheckpointTensor& t, const float* full, float* part) {
  for_each_slice_run(t, [&](std::int64_t f, std::int64_t p, std::int64_t n) { std::copy_n(full + f, n, part + p); });
}

// Checks tensor t of file f (dtype F32, the full shape, the checksum in the file's metadata) and
// returns this rank's part of it. FormatError naming the file and the tensor otherwise.
inline std::vector<float> verified_part(const io::SafetensorsFile& f, const CheckpointTensor& t) {
  const std::string& file = f.source();
  if (!f.contains(t.name)) throw FormatError(file + ": tensor '" + t.name + "' is missing");
  const io::TensorInfo& info = f.info(t.name);
  if (info.dtype != io::Dtype::kF32)
    throw FormatError(file + ": tensor '" + t.name + "' has dtype " + io::to_string(info.dtype) + ", expected F32");
  if (info.shape != t.shape)
    throw FormatError(file + ": tensor '" + t.name + "' has shape " + io::detail::shape_str(info.shape) + ", the model has " +
                      io::detail::shape_str(t.shape));
  const auto meta = f.metadata().find("xxh3:" + t.name);
  if (meta == f.metadata().end()) throw FormatError(file + ": tensor '" + t.name + "' has no checksum (metadata xxh3:" + t.name + ")");
  const std::vector<std::uint8_t> bytes = f.read(t.name);
  const std::string got = checksum_hex(bytes);
  if (got != meta->second)
    throw FormatError(file + ": tensor '" + t.name + "' is corrupt: its bytes hash to " + got + ", the file recorded " + meta->second);
  std::vector<float> full(std::size_t(t.full_numel()));
  io::detail::copy_from_le(bytes.data(), full.size(), full.data());
  if (t.slice_dim < 0) return full;
  std::vector<float> part(std::size_t(t.numel()));
  take_part(t, full.data(), part.data());
  return part;
}

}  // namespace detail
}  // namespace moekit::train
