#pragma once
// The safetensors writer (io/safetensors.hpp has the format and the reader): SafetensorsWriter
// reproduces the reference's `serialize` byte for byte (tensors ordered by descending dtype alignment
// then name, so every tensor stays aligned; header padded with spaces to 8 bytes) and writes
// atomically: a temporary file in the same folder, fsync, rename, fsync of the folder.
// Included by io/safetensors.hpp (which includes it back at its end), so either header gives both.
#include "moekit/io/safetensors.hpp"

namespace moekit::io {

namespace detail {
[[noreturn]] inline void throw_io(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), "moekit::io: " + what);
}

// Writes the concatenation of `pieces` to `path` so that readers see the old file or the new one,
// never a partial one: a temporary sibling (same filesystem, so rename is atomic), fsync, rename.
inline void write_atomically(const std::filesystem::path& path, const std::vector<std::span<const std::uint8_t>>& pieces) {
  static std::atomic<unsigned> counter{0};
  const std::string target = path.string();
#ifdef MOEKIT_IO_POSIX
  const std::string stem = "." + path.filename().string() + ".tmp." + std::to_string(::getpid()) + ".";
  std::filesystem::path tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 64 && fd < 0; ++attempt) {
    tmp = path.parent_path() / (stem + std::to_string(counter++));
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) throw_io(errno, "cannot create a temporary file next to '" + target + "'");
  }
  if (fd < 0) throw_io(EEXIST, "cannot create a temporary file next to '" + target + "'");
  auto fail = [&](const std::string& what) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw_io(err, what + " '" + tmp.string() + "' (writing '" + target + "')");
  };
  for (const auto& piece : pieces) {
    const std::uint8_t* p = piece.data();
    std::size_t left = piece.size();
    while (left > 0) {
      const ::ssize_t w = ::write(fd, p, std::min<std::size_t>(left, std::size_t(1) << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail("cannot write");
      p += w;
      left -= std::size_t(w);
    }
  }
  if (::fsync(fd) != 0) fail("cannot flush");
  const int closed = ::close(fd);
  fd = -1;
  if (closed != 0) fail("cannot close");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename");
  // Make the rename itself durable (best effort: some filesystems refuse fsync on a directory).
  const std::filesystem::path dir = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
#else
  const std::filesystem::path tmp = path.parent_path() / ("." + path.filename().string() + ".tmp." + std::to_string(counter++));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    for (const auto& piece : pieces)
      if (out) out.write(reinterpret_cast<const char*>(piece.data()), std::streamsize(piece.size()));
    out.flush();
    if (!out) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw_io(EIO, "cannot write '" + tmp.string() + "' (writing '" + target + "')");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw_io(EIO, "cannot rename '" + tmp.string() + "' to '" + target + "'");
  }
#endif
}
}  // namespace detail

// Collects named tensors (copies), then serialises them as the reference implementation does.
class SafetensorsWriter {
 public:
  // Adds a tensor of dtype_of_v<T>; data.size() must equal the product of `shape`.
  // Throws ShapeError on a size mismatch or negative dimension, std::invalid_argument on a bad name.
  template <class T>
  SafetensorsWriter& add(std::string name, std::vector<std::int64_t> shape, std::type_identity_t<std::span<const T>> data) {
    std::int64_t numel = 1;
    for (auto s : shape) {
      if (s < 0) throw ShapeError("safetensors writer: tensor '" + name + "' has a negative dimension in " + detail::shape_str(shape));
      if (s != 0 && numel > std::numeric_limits<std::int64_t>::max() / s)
        throw ShapeError("safetensors writer: tensor '" + name + "' shape " + detail::shape_str(shape) + " overflows int64");
      numel *= s;
    }
    if (std::uint64_t(numel) != data.size())
      throw ShapeError("safetensors writer: tensor '" + name + "' has shape " + detail::shape_str(shape) + " (" +
                       std::to_string(numel) + " elements) but " + std::to_string(data.size()) + " values were given");
    if (name == "__metadata__") throw std::invalid_argument("safetensors writer: the tensor name \"__metadata__\" is reserved");
    for (const auto& e : entries_)
      if (e.name == name) throw std::invalid_argument("safetensors writer: tensor '" + name + "' added twice");
    entries_.push_back({std::move(name), dtype_of_v<T>, std::move(shape), detail::to_le_bytes(data)});
    return *this;
  }
  SafetensorsWriter& add_f32(std::string name, std::vector<std::int64_t> shape, std::span<const float> v) { return add<float>(std::move(name), std::move(shape), v); }
  SafetensorsWriter& add_f64(std::string name, std::vector<std::int64_t> shape, std::span<const double> v) { return add<double>(std::move(name), std::move(shape), v); }
  SafetensorsWriter& add_i32(std::string name, std::vector<std::int64_t> shape, std::span<const std::int32_t> v) { return add<std::int32_t>(std::move(name), std::move(shape), v); }
  SafetensorsWriter& add_i64(std::string name, std::vector<std::int64_t> shape, std::span<const std::int64_t> v) { return add<std::int64_t>(std::move(name), std::move(shape), v); }
  SafetensorsWriter& add_bf16(std::string name, std::vector<std::int64_t> shape, std::span<const bf16> v) { return add<bf16>(std::move(name), std::move(shape), v); }
  // Rounds float to bf16 (nearest even) and stores BF16.
  SafetensorsWriter& add_f32_as_bf16(std::string name, std::vector<std::int64_t> shape, std::span<const float> v) {
    std::vector<bf16> b(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) b[i] = bf16(v[i]);
    return add<bf16>(std::move(name), std::move(shape), b);
  }
  SafetensorsWriter& set_metadata(std::string key, std::string value) {
    metadata_[std::move(key)] = std::move(value);
    return *this;
  }

  // The JSON header, padded with spaces to a multiple of 8 bytes.
  std::string header() const {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      h["__metadata__"] = nlohmann::ordered_json::object();
      for (const auto& [k, v] : metadata_) h["__metadata__"][k] = v;
    }
    std::uint64_t offset = 0;
    for (const Entry* e : ordered()) {
      nlohmann::ordered_json t = nlohmann::ordered_json::object();
      t["dtype"] = to_string(e->dtype);
      t["shape"] = nlohmann::ordered_json::array();
      for (auto s : e->shape) t["shape"].push_back(std::uint64_t(s));
      t["data_offsets"] = {offset, offset + e->bytes.size()};
      offset += e->bytes.size();
      h[e->name] = std::move(t);
    }
    std::string s;
    try {
      s = h.dump();
    } catch (const nlohmann::json::exception& ex) {  // a name or metadata string that is not valid UTF-8
      throw std::invalid_argument(std::string("safetensors writer: ") + ex.what());
    }
    s.append((8 - s.size() % 8) % 8, ' ');
    return s;
  }
  // The whole file in memory.
  std::vector<std::uint8_t> serialize() const {
    const std::string h = header();
    const std::vector<std::uint8_t> len = length_prefix(h);  // named: the pieces view it
    std::vector<std::uint8_t> out;
    for (const auto& piece : pieces(h, len)) out.insert(out.end(), piece.begin(), piece.end());
    return out;
  }
  // Writes the file atomically (see detail::write_atomically); throws std::system_error on I/O failure.
  void write(const std::filesystem::path& path) const {
    const std::string h = header();
    detail::write_atomically(path, pieces(h, length_prefix(h)));
  }

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> bytes;
  };
  // The reference's data order: descending dtype alignment, then name (bytewise).
  std::vector<const Entry*> ordered() const {
    std::vector<const Entry*> o;
    for (const auto& e : entries_) o.push_back(&e);
    std::sort(o.begin(), o.end(), [](const Entry* a, const Entry* b) {
      return a->dtype != b->dtype ? a->dtype > b->dtype : a->name < b->name;
    });
    return o;
  }
  static std::vector<std::uint8_t> length_prefix(const std::string& header) {
    const std::uint64_t n = header.size();
    return detail::to_le_bytes(std::span<const std::uint64_t>(&n, 1));
  }
  // Views of [length][header][tensor data...]; valid while `len`, `header` and *this live.
  std::vector<std::span<const std::uint8_t>> pieces(const std::string& header, const std::vector<std::uint8_t>& len) const {
    std::vector<std::span<const std::uint8_t>> p{len, {reinterpret_cast<const std::uint8_t*>(header.data()), header.size()}};
    for (const Entry* e : ordered()) p.emplace_back(e->bytes);
    return p;
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moekit::io
