#pragma once
// safetensors files (https://github.com/huggingface/safetensors):
//   [u64 little-endian N][N bytes of JSON header][data buffer]
//   header = {"__metadata__": {"key": "value", ...},
//             "<tensor>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
// Offsets are relative to the start of the data buffer; data is little-endian, row-major.
//
// The reader loads the whole file and checks every rule the reference implementation checks (header
// length, JSON, fields, dtype, numel x dtype size, offsets covering the buffer exactly, no overlaps, no
// gaps) plus duplicate keys; any violation throws moekit::FormatError naming the file, the tensor and
// the rule. The writer reproduces the reference's `serialize` byte for byte (tensors ordered by
// descending dtype alignment then name, so every tensor stays aligned; header padded with spaces to
// 8 bytes) and writes atomically: a temporary file in the same folder, then a rename.
//
// This header needs nlohmann_json (link nlohmann_json::nlohmann_json); nothing else in moekit does.
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/core/bf16.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/tensor.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <cerrno>
#include <fcntl.h>
#include <unistd.h>
#define MOEKIT_IO_POSIX 1
#endif

namespace moekit::io {

// In the reference's order: ascending alignment. The writer sorts by it (descending).
enum class Dtype : std::uint8_t { kBool, kU8, kI8, kF8E5M2, kF8E4M3, kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kF64, kI64, kU64 };

namespace detail {
struct DtypeInfo {
  const char* name;
  std::size_t size;
};
inline constexpr std::array<DtypeInfo, 15> kDtypes{{{"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1},
                                                    {"I16", 2}, {"U16", 2}, {"F16", 2}, {"BF16", 2}, {"I32", 4},
                                                    {"U32", 4}, {"F32", 4}, {"F64", 8}, {"I64", 8}, {"U64", 8}}};
// The reference refuses headers above 100 MB; so do we, before allocating anything for them.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
template <class>
inline constexpr bool dependent_false = false;
}  // namespace detail

inline const char* to_string(Dtype d) { return detail::kDtypes[static_cast<std::size_t>(d)].name; }
inline std::size_t dtype_size(Dtype d) { return detail::kDtypes[static_cast<std::size_t>(d)].size; }
inline std::optional<Dtype> parse_dtype(std::string_view s) {
  for (std::size_t i = 0; i < detail::kDtypes.size(); ++i)
    if (s == detail::kDtypes[i].name) return static_cast<Dtype>(i);
  return std::nullopt;
}

// The safetensors dtype of a C++ element type (the typed getters and add<T> use it).
template <class T>
struct dtype_of {
  static_assert(detail::dependent_false<T>,
                "moekit::io: no safetensors dtype for this element type (supported: float, double, bf16, "
                "int8/16/32/64, uint8/16/32/64)");
};
template <Dtype D>
struct dtype_tag {
  static constexpr Dtype value = D;
};
template <> struct dtype_of<float> : dtype_tag<Dtype::kF32> {};
template <> struct dtype_of<double> : dtype_tag<Dtype::kF64> {};
template <> struct dtype_of<bf16> : dtype_tag<Dtype::kBF16> {};
template <> struct dtype_of<std::int8_t> : dtype_tag<Dtype::kI8> {};
template <> struct dtype_of<std::int16_t> : dtype_tag<Dtype::kI16> {};
template <> struct dtype_of<std::int32_t> : dtype_tag<Dtype::kI32> {};
template <> struct dtype_of<std::int64_t> : dtype_tag<Dtype::kI64> {};
template <> struct dtype_of<std::uint8_t> : dtype_tag<Dtype::kU8> {};
template <> struct dtype_of<std::uint16_t> : dtype_tag<Dtype::kU16> {};
template <> struct dtype_of<std::uint32_t> : dtype_tag<Dtype::kU32> {};
template <> struct dtype_of<std::uint64_t> : dtype_tag<Dtype::kU64> {};
template <class T>
inline constexpr Dtype dtype_of_v = dtype_of<T>::value;

namespace detail {
inline std::string shape_str(const std::vector<std::int64_t>& s) { return shape_string(s.data(), int(s.size())); }

// Copies n elements of `bytes` (little-endian) into out[0..n), swapping on a big-endian host.
template <class T>
void copy_from_le(const std::uint8_t* bytes, std::size_t n, T* out) {
  static_assert(std::is_trivially_copyable_v<T>, "moekit::io: elements must be trivially copyable");
  if (n) std::memcpy(static_cast<void*>(out), bytes, n * sizeof(T));
  if constexpr (std::endian::native == std::endian::big && sizeof(T) > 1) {
    auto* b = reinterpret_cast<std::uint8_t*>(out);
    for (std::size_t i = 0; i < n; ++i) std::reverse(b + i * sizeof(T), b + (i + 1) * sizeof(T));
  }
}
template <class T>
std::vector<std::uint8_t> to_le_bytes(std::span<const T> v) {
  std::vector<std::uint8_t> b(v.size_bytes());
  if (!v.empty()) std::memcpy(b.data(), static_cast<const void*>(v.data()), b.size());
  if constexpr (std::endian::native == std::endian::big && sizeof(T) > 1)
    for (std::size_t i = 0; i < v.size(); ++i) std::reverse(b.begin() + i * sizeof(T), b.begin() + (i + 1) * sizeof(T));
  return b;
}
}  // namespace detail

// One tensor of a file: dtype, shape and its byte range [begin, end) in the data buffer.
struct TensorInfo {
  Dtype dtype = Dtype::kF32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

// A validated safetensors file: the whole file in memory (parse, read_safetensors), or only its header,
// the tensors read from the file on demand (open_safetensors: a rank of a sharded checkpoint reads just
// the tensors it needs).
class SafetensorsFile {
 public:
  // Validates `bytes` as a safetensors file; `source` names it in error messages (usually the path).
  static SafetensorsFile parse(std::vector<std::uint8_t> bytes, std::string source);
  // Reads and validates the header of the file at `path` (against the file's size: every offset inside
  // the data buffer, no gaps or overlaps); the data stays on disk until read().
  static SafetensorsFile open(const std::filesystem::path& path);

  const std::string& source() const { return source_; }
  std::size_t size() const { return tensors_.size(); }
  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }
  std::vector<std::string> names() const {  // sorted
    std::vector<std::string> n;
    for (const auto& [k, v] : tensors_) n.push_back(k);
    return n;
  }
  const std::map<std::string, std::string, std::less<>>& metadata() const { return metadata_; }

  // Throws FormatError when there is no such tensor (the message lists what the file holds).
  const TensorInfo& info(std::string_view name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) throw error("no tensor named '" + std::string(name) + "' (" + listing() + ")");
    return it->second;
  }
  // The tensor's little-endian bytes, whatever its dtype (a file in memory only: see read()).
  std::span<const std::uint8_t> raw(std::string_view name) const {
    const TensorInfo& t = info(name);
    if (!in_memory_) throw error("raw(): the file was opened header-only; read() its tensors");
    return {bytes_.data() + data_start_ + t.begin, std::size_t(t.end - t.begin)};
  }
  // A copy of the tensor's bytes: from memory, or read from the file now (FormatError if the file has
  // changed size or cannot be read).
  std::vector<std::uint8_t> read(std::string_view name) const;

  // The elements of a tensor whose dtype is dtype_of_v<T>; with `expected_shape`, its shape must match.
  // Throws FormatError naming the tensor: missing, "expected F32, found BF16", "expected [4, 8], found [4, 9]".
  template <class T>
  std::vector<T> get(std::string_view name) const { return get_impl<T>(name, nullptr); }
  template <class T>
  std::vector<T> get(std::string_view name, const std::vector<std::int64_t>& expected_shape) const {
    return get_impl<T>(name, &expected_shape);
  }
  std::vector<float> get_f32(std::string_view name) const { return get<float>(name); }
  std::vector<float> get_f32(std::string_view name, const std::vector<std::int64_t>& shape) const { return get<float>(name, shape); }
  std::vector<double> get_f64(std::string_view name, const std::vector<std::int64_t>& shape) const { return get<double>(name, shape); }
  std::vector<std::int32_t> get_i32(std::string_view name) const { return get<std::int32_t>(name); }
  std::vector<std::int32_t> get_i32(std::string_view name, const std::vector<std::int64_t>& shape) const { return get<std::int32_t>(name, shape); }
  std::vector<std::int64_t> get_i64(std::string_view name, const std::vector<std::int64_t>& shape) const { return get<std::int64_t>(name, shape); }
  std::vector<bf16> get_bf16(std::string_view name, const std::vector<std::int64_t>& shape) const { return get<bf16>(name, shape); }
  // A BF16 tensor widened to float (exact).
  std::vector<float> get_bf16_as_f32(std::string_view name, const std::vector<std::int64_t>& shape) const {
    const auto b = get<bf16>(name, shape);
    std::vector<float> f(b.size());
    for (std::size_t i = 0; i < b.size(); ++i) f[i] = static_cast<float>(b[i]);
    return f;
  }

 private:
  FormatError error(const std::string& what) const { return FormatError(source_ + ": " + what); }
  FormatError tensor_error(std::string_view name, const std::string& what) const {
    return error("tensor '" + std::string(name) + "': " + what);
  }
  std::string listing() const {
    if (tensors_.empty()) return "the file holds no tensors";
    std::string s = "the file holds " + std::to_string(tensors_.size()) + " tensors: ";
    std::size_t i = 0;
    for (const auto& [k, v] : tensors_) {
      if (i == 12) return s + ", ...";
      s += (i++ ? ", " : "") + k;
    }
    return s;
  }
  template <class T>
  std::vector<T> get_impl(std::string_view name, const std::vector<std::int64_t>* expected) const {
    constexpr Dtype want = dtype_of_v<T>;
    static_assert(sizeof(T) == detail::kDtypes[static_cast<std::size_t>(want)].size, "element size must match the dtype");
    const TensorInfo& t = info(name);
    if (t.dtype != want)
      throw tensor_error(name, std::string("wrong dtype: expected ") + to_string(want) + ", found " + to_string(t.dtype));
    if (expected && t.shape != *expected)
      throw tensor_error(name, "wrong shape: expected " + detail::shape_str(*expected) + ", found " + detail::shape_str(t.shape));
    std::vector<T> out(static_cast<std::size_t>(t.numel()));
    if (in_memory_) {
      detail::copy_from_le(bytes_.data() + data_start_ + t.begin, out.size(), out.data());
    } else {
      const std::vector<std::uint8_t> b = read(name);
      detail::copy_from_le(b.data(), out.size(), out.data());
    }
    return out;
  }
  void parse_header(std::string_view header);

  std::string source_;
  std::vector<std::uint8_t> bytes_;  // the whole file (in_memory_), or nothing
  bool in_memory_ = true;
  std::uint64_t file_size_ = 0;      // of the file when opened
  std::size_t data_start_ = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string, std::less<>> metadata_;
};

inline SafetensorsFile SafetensorsFile::parse(std::vector<std::uint8_t> bytes, std::string source) {
  SafetensorsFile f;
  f.source_ = std::move(source);
  f.bytes_ = std::move(bytes);
  const std::uint64_t size = f.bytes_.size();
  if (size < 8)
    throw f.error("file is " + std::to_string(size) +
                  " bytes, shorter than the 8-byte header length (truncated, or not a safetensors file)");
  std::uint64_t n = 0;
  detail::copy_from_le(f.bytes_.data(), 1, &n);
  if (n > detail::kMaxHeaderBytes)
    throw f.error("header length " + std::to_string(n) + " exceeds the limit of " +
                  std::to_string(detail::kMaxHeaderBytes) + " bytes (not a safetensors file?)");
  if (n > size - 8)
    throw f.error("header length " + std::to_string(n) + " runs past the end of the file (only " +
                  std::to_string(size - 8) + " bytes follow the length field; truncated?)");
  f.data_start_ = std::size_t(8 + n);
  f.file_size_ = size;
  f.parse_header(std::string_view(reinterpret_cast<const char*>(f.bytes_.data() + 8), std::size_t(n)));
  return f;
}

inline void SafetensorsFile::parse_header(std::string_view header) {
  using json = nlohmann::json;
  if (header.empty() || header.front() != '{') throw error("header must be a JSON object starting with '{'");
  // nlohmann keeps the last of duplicate keys silently; a duplicated tensor name is a corrupt file.
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto track_keys = [&](int, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::object_start) open_objects.emplace_back();
    else if (ev == json::parse_event_t::object_end && !open_objects.empty()) open_objects.pop_back();
    else if (ev == json::parse_event_t::key && !open_objects.empty() && duplicate.empty() &&
             !open_objects.back().insert(parsed.get<std::string>()).second)
      duplicate = parsed.get<std::string>();
    return true;
  };
  json j;
  try {
    j = json::parse(header.begin(), header.end(), track_keys);
  } catch (const json::exception& e) {
    throw error(std::string("header is not valid JSON: ") + e.what());
  }
  if (!duplicate.empty()) throw error("header repeats the key \"" + duplicate + "\"");
  if (!j.is_object()) throw error("header must be a JSON object");

  const std::uint64_t data_size = file_size_ - data_start_;
  auto non_negative = [&](const std::string& name, const json& v, const std::string& what) -> std::uint64_t {
    if (v.is_number_unsigned()) return v.get<std::uint64_t>();
    if (v.is_number_integer()) throw tensor_error(name, what + " must be >= 0, found " + v.dump());
    throw tensor_error(name, what + " must be a non-negative integer, found " + v.dump());
  };
  for (const auto& [name, entry] : j.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw error("\"__metadata__\" must be an object of strings, found " + entry.dump());
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) throw error("\"__metadata__\" value of \"" + k + "\" must be a string, found " + v.dump());
        metadata_.emplace(k, v.get<std::string>());
      }
      continue;
    }
    if (!entry.is_object()) throw tensor_error(name, "entry must be an object with dtype, shape and data_offsets");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(field)) throw tensor_error(name, std::string("missing field \"") + field + "\"");
    TensorInfo t;
    const json& dt = entry["dtype"];
    if (!dt.is_string()) throw tensor_error(name, "\"dtype\" must be a string, found " + dt.dump());
    const auto dtype = parse_dtype(dt.get<std::string>());
    if (!dtype) {
      std::string known;
      for (const auto& d : detail::kDtypes) known += (known.empty() ? "" : ", ") + std::string(d.name);
      throw tensor_error(name, "unknown dtype " + dt.dump() + " (known: " + known + ")");
    }
    t.dtype = *dtype;
    const json& shape = entry["shape"];
    if (!shape.is_array()) throw tensor_error(name, "\"shape\" must be an array, found " + shape.dump());
    std::uint64_t numel = 1;
    bool overflow = false;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      const std::uint64_t d = non_negative(name, shape[i], "shape[" + std::to_string(i) + "]");
      if (d > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
        throw tensor_error(name, "shape[" + std::to_string(i) + "] = " + std::to_string(d) + " is too large");
      overflow = overflow || (d != 0 && numel > std::numeric_limits<std::uint64_t>::max() / d);
      numel *= d;
      t.shape.push_back(std::int64_t(d));
    }
    const std::uint64_t esize = dtype_size(t.dtype);
    if (overflow || numel > std::uint64_t(std::numeric_limits<std::int64_t>::max()) / esize)
      throw tensor_error(name, "shape " + shape.dump() + " holds more bytes than fit in 64 bits");
    const json& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2)
      throw tensor_error(name, "\"data_offsets\" must be an array [begin, end], found " + off.dump());
    t.begin = non_negative(name, off[0], "data_offsets[0]");
    t.end = non_negative(name, off[1], "data_offsets[1]");
    const std::string range = "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "]";
    if (t.begin > t.end) throw tensor_error(name, range + " end before they begin");
    if (t.end - t.begin != numel * esize)
      throw tensor_error(name, range + " hold " + std::to_string(t.end - t.begin) + " bytes but " + dt.get<std::string>() +
                                   " " + shape.dump() + " needs " + std::to_string(numel * esize) +
                                   " (numel x dtype size)");
    if (t.end > data_size)
      throw tensor_error(name, range + " run past the end of the data buffer (" + std::to_string(data_size) +
                                   " bytes; truncated file?)");
    tensors_.emplace(name, std::move(t));
  }

  // As the reference requires: sorted by offset, the tensors tile the data buffer exactly.
  std::vector<const std::pair<const std::string, TensorInfo>*> order;
  for (const auto& e : tensors_) order.push_back(&e);
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) {
    return std::pair(a->second.begin, a->second.end) < std::pair(b->second.begin, b->second.end);
  });
  std::uint64_t covered = 0;
  const std::string* prev = nullptr;
  for (const auto* e : order) {
    const TensorInfo& t = e->second;
    if (t.begin < covered)
      throw tensor_error(e->first, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                                       "] overlap tensor '" + *prev + "' (which ends at " + std::to_string(covered) + ")");
    if (t.begin > covered)
      throw tensor_error(e->first, "bytes [" + std::to_string(covered) + ", " + std::to_string(t.begin) +
                                       ") of the data buffer before it belong to no tensor (gaps are not allowed)");
    covered = t.end;
    prev = &e->first;
  }
  if (covered != data_size)
    throw error("the data buffer holds " + std::to_string(data_size) + " bytes but the tensors cover " +
                std::to_string(covered) + " (trailing bytes are not allowed)");
}

inline SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  SafetensorsFile f;
  f.source_ = path.string();
  f.in_memory_ = false;
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) throw f.error("no such file");
  if (!std::filesystem::is_regular_file(status)) throw f.error("is not a regular file");
  const std::uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) throw f.error("cannot read its size");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw f.error("cannot open for reading");
  if (size < 8)
    throw f.error("file is " + std::to_string(size) +
                  " bytes, shorter than the 8-byte header length (truncated, or not a safetensors file)");
  std::uint8_t len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  std::uint64_t n = 0;
  detail::copy_from_le(len, 1, &n);
  // Both limits before the header's buffer is allocated.
  if (n > detail::kMaxHeaderBytes)
    throw f.error("header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(detail::kMaxHeaderBytes) +
                  " bytes (not a safetensors file?)");
  if (n > size - 8)
    throw f.error("header length " + std::to_string(n) + " runs past the end of the file (only " + std::to_string(size - 8) +
                  " bytes follow the length field; truncated?)");
  std::string header(std::size_t(n), '\0');
  if (!in.read(header.data(), std::streamsize(n))) throw f.error("read error in the header");
  f.data_start_ = std::size_t(8 + n);
  f.file_size_ = size;
  f.parse_header(header);
  return f;
}

inline std::vector<std::uint8_t> SafetensorsFile::read(std::string_view name) const {
  const TensorInfo& t = info(name);
  const std::size_t n = std::size_t(t.end - t.begin);
  if (in_memory_) {
    const auto b = bytes_.begin() + std::ptrdiff_t(data_start_ + t.begin);
    return std::vector<std::uint8_t>(b, b + std::ptrdiff_t(n));
  }
  std::error_code ec;
  const std::uint64_t size = std::filesystem::file_size(source_, ec);
  if (ec || size != file_size_)
    throw tensor_error(name, "the file changed size since its header was read (" + std::to_string(file_size_) + " bytes, now " +
                                 (ec ? std::string("unreadable") : std::to_string(size)) + ")");
  std::ifstream in(source_, std::ios::binary);
  std::vector<std::uint8_t> out(n);
  in.seekg(std::streamoff(data_start_ + t.begin));
  if (!in || !in.read(reinterpret_cast<char*>(out.data()), std::streamsize(n))) throw tensor_error(name, "read error");
  return out;
}

// Reads and validates a whole file; FormatError names the path on any problem, including a missing file.
inline SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  const std::string src = path.string();
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) throw FormatError(src + ": no such file");
  if (std::filesystem::is_directory(status)) throw FormatError(src + ": is a directory, not a safetensors file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(src + ": cannot open for reading");
  std::vector<std::uint8_t> bytes;
  if (std::filesystem::is_regular_file(status)) {
    const auto n = std::filesystem::file_size(path, ec);
    if (!ec) bytes.reserve(std::size_t(n));
  }
  std::array<char, 1 << 16> chunk;
  while (in.read(chunk.data(), chunk.size()) || in.gcount() > 0)
    bytes.insert(bytes.end(), chunk.data(), chunk.data() + in.gcount());
  if (in.bad()) throw FormatError(src + ": read error");
  return SafetensorsFile::parse(std::move(bytes), src);
}

}  // namespace moekit::io

#include "moekit/io/safetensors_writer.hpp"  // IWYU pragma: export
