#pragma once
// Checkpoints of a training run (docs/checkpoints.md): a directory per step under one root,
//
//   ROOT/step-000123/model.safetensors      the model's parameters under their names (fp32)
//                    optimizer.safetensors  AdamW's moments: optim.m.<name>, optim.v.<name>
//                    trainer.json           format, moekit version, step, and the caller's state
//                                           (trainer bookkeeping, RNG states, router state, config)
//
// Every tensor's bytes carry an XXH3-64 checksum in its file's metadata ("xxh3:<name>"). A checkpoint
// is written into a hidden sibling (.step-000123.tmp-<pid>), each file fsynced, then the directory is
// renamed into place and ROOT fsynced: a crash at any moment leaves either the whole checkpoint or
// none under its name. trainer.json is written last inside the temporary directory.
//
// Loading verifies everything first: every expected tensor present, no unknown one, dtype F32, the
// shape, the checksum, trainer.json's format and step. Only then are the caller's buffers written, so
// a failed load (moekit::FormatError naming the file, the tensor and the rule) leaves the model as it
// was. load_newest() walks the checkpoints newest first and says why it skipped each one.
//
// One process for now: the tensors are the caller's host buffers, full (unsharded) tensors.
// Needs nlohmann_json and xxHash's header (Debian libxxhash-dev; used inline, no library to link).
#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "moekit/core/error.hpp"
#include "moekit/io/safetensors.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#endif

namespace moekit::train {

inline constexpr int kCheckpointFormat = 1;
inline constexpr const char* kMoekitVersion = "0.1.0";  // CMakeLists.txt's project VERSION

// A host fp32 tensor that a checkpoint saves from, and loads into, in place.
struct CheckpointTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  float* data = nullptr;
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

// What one checkpoint holds: two sets of tensors and a JSON state of the caller's choosing.
struct CheckpointContent {
  std::vector<CheckpointTensor> model;      // model.safetensors
  std::vector<CheckpointTensor> optimizer;  // optimizer.safetensors
  nlohmann::json state;                     // trainer.json's "state"
};

// XXH3-64 of bytes, as 16 lower-case hex digits.
inline std::string checksum_hex(std::span<const std::uint8_t> bytes) {
  const XXH64_hash_t h = XXH3_64bits(bytes.data(), bytes.size());
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

namespace detail {

inline void fsync_path(const std::filesystem::path& p) {
#if defined(__unix__) || defined(__APPLE__)
  const int fd = ::open(p.c_str(), O_RDONLY);
  if (fd >= 0) {
    (void)::fsync(fd);  // best effort on directories: some filesystems refuse
    ::close(fd);
  }
#else
  (void)p;
#endif
}

inline void write_tensors(const std::filesystem::path& path, const std::vector<CheckpointTensor>& ts) {
  io::SafetensorsWriter w;
  w.set_metadata("format", "moekit-checkpoint-" + std::to_string(kCheckpointFormat));
  for (const auto& t : ts) {
    const std::span<const float> v(t.data, std::size_t(t.numel()));
    w.add_f32(t.name, t.shape, v);
    w.set_metadata("xxh3:" + t.name, checksum_hex({reinterpret_cast<const std::uint8_t*>(v.data()), v.size_bytes()}));
  }
  w.write(path);  // temporary sibling, fsync, rename (io/safetensors.hpp)
}

// Verifies a tensor file against the expected tensors; returns it (the bytes stay in it) or throws.
inline io::SafetensorsFile verified_tensors(const std::filesystem::path& path, const std::vector<CheckpointTensor>& want) {
  const std::string file = path.string();
  if (!std::filesystem::exists(path)) throw FormatError(file + ": missing");
  io::SafetensorsFile f = io::read_safetensors(path);  // the format's own rules
  std::set<std::string> expected;
  for (const auto& t : want) {
    expected.insert(t.name);
    if (!f.contains(t.name)) throw FormatError(file + ": tensor '" + t.name + "' is missing");
    const io::TensorInfo& info = f.info(t.name);
    if (info.dtype != io::Dtype::kF32)
      throw FormatError(file + ": tensor '" + t.name + "' has dtype " + io::to_string(info.dtype) + ", expected F32");
    if (info.shape != t.shape)
      throw FormatError(file + ": tensor '" + t.name + "' has shape " + io::detail::shape_str(info.shape) + ", the model has " +
                        io::detail::shape_str(t.shape));
    const auto meta = f.metadata().find("xxh3:" + t.name);
    if (meta == f.metadata().end()) throw FormatError(file + ": tensor '" + t.name + "' has no checksum (metadata xxh3:" + t.name + ")");
    const std::string got = checksum_hex(f.raw(t.name));
    if (got != meta->second)
      throw FormatError(file + ": tensor '" + t.name + "' is corrupt: its bytes hash to " + got + ", the file recorded " + meta->second);
  }
  for (const auto& name : f.names())
    if (!expected.count(name)) throw FormatError(file + ": tensor '" + name + "' is not in the model");
  return f;
}

inline void copy_into(const io::SafetensorsFile& f, const std::vector<CheckpointTensor>& ts) {
  for (const auto& t : ts) {
    const auto raw = f.raw(t.name);
    if (!raw.empty()) std::memcpy(static_cast<void*>(t.data), raw.data(), raw.size());  // little-endian hosts (checked by the reader)
  }
}

}  // namespace detail

// The checkpoints under one root directory.
class CheckpointDir {
 public:
  // keep: how many of the newest checkpoints save() leaves (0: all).
  explicit CheckpointDir(std::filesystem::path root, int keep = 0) : root_(std::move(root)), keep_(keep) {
    if (keep < 0) throw ConfigError("keep", std::to_string(keep), "must be >= 0 (0 keeps every checkpoint)");
  }
  const std::filesystem::path& root() const { return root_; }

  static std::string name_of(std::int64_t step) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "step-%06lld", static_cast<long long>(step));
    return buf;
  }
  // The step of a directory name "step-<digits>", or nothing.
  static std::optional<std::int64_t> step_of(const std::string& name) {
    if (name.size() <= 5 || name.rfind("step-", 0) != 0) return std::nullopt;
    std::int64_t v = 0;
    const char* b = name.data() + 5;
    const char* e = name.data() + name.size();
    const auto r = std::from_chars(b, e, v);
    if (r.ec != std::errc() || r.ptr != e || v < 0) return std::nullopt;
    return v;
  }

  // The committed checkpoints, newest (highest step) first.
  std::vector<std::pair<std::int64_t, std::filesystem::path>> list() const {
    std::vector<std::pair<std::int64_t, std::filesystem::path>> out;
    std::error_code ec;
    if (!std::filesystem::is_directory(root_, ec)) return out;
    for (const auto& e : std::filesystem::directory_iterator(root_)) {
      const auto s = step_of(e.path().filename().string());
      if (s && e.is_directory()) out.emplace_back(*s, e.path());
    }
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    return out;
  }

  // Writes the checkpoint of `step` and returns its directory; then removes all but the newest `keep`.
  std::filesystem::path save(std::int64_t step, const CheckpointContent& c) const {
    namespace fs = std::filesystem;
    fs::create_directories(root_);
    const std::string name = name_of(step);
    const fs::path tmp = root_ / ("." + name + ".tmp-" + std::to_string(pid()));
    fs::remove_all(tmp);
    fs::create_directory(tmp);
    detail::write_tensors(tmp / "model.safetensors", c.model);
    detail::write_tensors(tmp / "optimizer.safetensors", c.optimizer);
    nlohmann::json meta = {{"format", kCheckpointFormat}, {"moekit_version", kMoekitVersion}, {"step", step},
                           {"model_tensors", c.model.size()}, {"optimizer_tensors", c.optimizer.size()}, {"state", c.state}};
    const std::string text = meta.dump(1) + "\n";
    io::detail::write_atomically(tmp / "trainer.json", {{reinterpret_cast<const std::uint8_t*>(text.data()), text.size()}});
    detail::fsync_path(tmp);
    const fs::path final_dir = root_ / name;
    if (fs::exists(final_dir)) {  // the same step again: move the old one aside first (rename cannot replace a full folder)
      const fs::path old = root_ / ("." + name + ".old-" + std::to_string(pid()));
      fs::remove_all(old);
      fs::rename(final_dir, old);
      fs::rename(tmp, final_dir);
      fs::remove_all(old);
    } else {
      fs::rename(tmp, final_dir);
    }
    detail::fsync_path(root_);
    prune();
    return final_dir;
  }

  // Verifies the checkpoint in `dir` against `c` (names, shapes, checksums, format), then writes its
  // tensors into c's buffers and returns trainer.json's "state". Throws FormatError before writing
  // anything when something does not verify.
  static nlohmann::json load(const std::filesystem::path& dir, const CheckpointContent& c) {
    const auto step = step_of(dir.filename().string());
    const std::filesystem::path meta_path = dir / "trainer.json";
    const std::string file = meta_path.string();
    if (!std::filesystem::exists(meta_path)) throw FormatError(file + ": missing (the checkpoint was not completed)");
    nlohmann::json meta;
    {
      std::ifstream in(meta_path);
      try {
        meta = nlohmann::json::parse(in);
      } catch (const nlohmann::json::exception& e) {
        throw FormatError(file + ": not valid JSON (" + e.what() + ")");
      }
    }
    if (!meta.is_object() || !meta.contains("format") || !meta["format"].is_number_integer())
      throw FormatError(file + ": field 'format' is missing or not an integer");
    if (meta["format"].get<int>() != kCheckpointFormat)
      throw FormatError(file + ": field 'format' is " + meta["format"].dump() + ", this moekit reads format " +
                        std::to_string(kCheckpointFormat));
    if (!meta.contains("step") || !meta["step"].is_number_integer() || (step && meta["step"].get<std::int64_t>() != *step))
      throw FormatError(file + ": field 'step' is " + (meta.contains("step") ? meta["step"].dump() : std::string("missing")) +
                        ", the directory says " + (step ? std::to_string(*step) : std::string("no step")));
    if (!meta.contains("state")) throw FormatError(file + ": field 'state' is missing");
    const io::SafetensorsFile model = detail::verified_tensors(dir / "model.safetensors", c.model);
    const io::SafetensorsFile optim = detail::verified_tensors(dir / "optimizer.safetensors", c.optimizer);
    detail::copy_into(model, c.model);
    detail::copy_into(optim, c.optimizer);
    return meta["state"];
  }

  struct Loaded {
    std::int64_t step = 0;
    std::filesystem::path dir;
    nlohmann::json state;
  };
  // The newest checkpoint that verifies, loaded into c's buffers; `skipped` gets "DIR: why" for each
  // newer one that did not verify. Nothing when none does (the buffers are then untouched).
  std::optional<Loaded> load_newest(const CheckpointContent& c, std::vector<std::string>& skipped) const {
    for (const auto& [step, dir] : list()) {
      try {
        return Loaded{step, dir, load(dir, c)};
      } catch (const std::exception& e) {
        skipped.push_back(dir.string() + ": " + e.what());
      }
    }
    return std::nullopt;
  }

 private:
  static long pid() {
#if defined(__unix__) || defined(__APPLE__)
    return long(::getpid());
#else
    return 0;
#endif
  }
  // Removes all but the newest keep_ checkpoints, and what killed writers left (hidden .step-* folders).
  void prune() const {
    namespace fs = std::filesystem;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(root_)) {
      const std::string n = e.path().filename().string();
      if (n.rfind(".step-", 0) == 0) fs::remove_all(e.path(), ec);
    }
    if (keep_ == 0) return;
    const auto all = list();
    for (std::size_t i = std::size_t(keep_); i < all.size(); ++i) fs::remove_all(all[i].second, ec);
  }

  std::filesystem::path root_;
  int keep_ = 0;
};

}  // namespace moekit::train
