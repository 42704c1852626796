#pragma once
// Checkpoints of a training run (docs/checkpoints.md): a directory per step under one root,
//
//   ROOT/step-000123/model.safetensors      the model's parameters, full tensors under their names (fp32)
//                    optimizer.safetensors  AdamW's moments: optim.m.<name>, optim.v.<name>
//                    trainer.json           format, moekit version, step, the files, and the caller's
//                                           state (trainer bookkeeping, RNG states, router state, config)
//
// Under mpirun each rank writes only the full tensors it is the writer of (a sliced tensor after
// gathering its slices from the other ranks of its slice group): no tensor is written twice. With more
// than one writing rank the tensors are spread over model-0000r-of-0000n.safetensors (one file per
// writing rank) with an index model.safetensors.index.json ({"weight_map": {name: file}}, as Hugging
// Face's sharded checkpoints), and the same for the optimizer. Rank 0 writes trainer.json last.
//
// Every tensor's bytes carry an XXH3-64 checksum in its file's metadata ("xxh3:<name>"). A checkpoint
// is written into a hidden sibling (.step-000123.tmp-<pid of rank 0>), each file fsynced, then rank 0
// renames the directory into place and fsyncs ROOT: a crash at any moment leaves either the whole
// checkpoint or none under its name. Under mpirun ROOT must be one folder that every rank sees (a
// local disk for one machine, a shared filesystem for several).
//
// Loading verifies everything first: trainer.json's format and step, the index, every expected tensor
// present in its file, no unknown one, dtype F32, the full shape, the checksum. Only then are the
// caller's buffers written, so a failed load (moekit::FormatError naming the file, the tensor and the
// rule, and under mpirun the rank that found it) leaves the model as it was. Each rank reads only the
// tensors it holds, in whatever layout it runs now (resharding: a tensor's slice is cut from the full
// tensor, which is read whole to check its checksum). Every rank takes the same decision.
// load_newest() walks the checkpoints newest first and says why it skipped each one.
//
// Needs nlohmann_json and xxHash's header (Debian libxxhash-dev; used inline, no library to link).
#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/core/error.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/parallel/comm/communicator.hpp"
#include "moekit/train/checkpoint_tensors.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#endif

namespace moekit::train {

inline constexpr int kCheckpointFormat = 2;
#ifdef MOEKIT_VERSION
inline constexpr const char* kMoekitVersion = MOEKIT_VERSION;  // CMakeLists.txt's project VERSION
#else
inline constexpr const char* kMoekitVersion = "unknown";
#endif

// What one checkpoint holds: two sets of tensors and JSON states of the caller's choosing.
struct CheckpointContent {
  std::vector<CheckpointTensor> model;      // model*.safetensors
  std::vector<CheckpointTensor> optimizer;  // optimizer*.safetensors
  nlohmann::json state;                     // trainer.json's "state": rank 0's
  nlohmann::json rank_state;                // trainer.json's "rank_states": every rank's, in rank order
  // Host copies that some tensors above point into (parameters that live elsewhere: a device group's,
  // bf16 masters), and what load() runs after it has written every buffer (copy them back there).
  std::vector<std::vector<float>> staging;
  std::vector<std::function<void()>> after_load;
};

// The ranks a checkpoint is written and read by (both null: one process). slices: the ranks that hold
// the other slices of this rank's sliced tensors, every one of them listing the same sliced tensors in
// the same order (a tp group); null when no tensor is sliced.
struct CheckpointRanks {
  comm::HostCommunicator* world = nullptr;
  comm::HostCommunicator* slices = nullptr;
};

// A checkpoint read back.
struct LoadedCheckpoint {
  std::int64_t step = 0;
  std::filesystem::path dir;
  nlohmann::json state;                     // rank 0's
  std::vector<nlohmann::json> rank_states;  // of every rank that wrote it
};

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

// The world of a checkpoint: every rank takes part in every call, in the same order.
class CheckpointWorld {
 public:
  explicit CheckpointWorld(const CheckpointRanks& r) : r_(r) {}
  int rank() const { return r_.world ? r_.world->rank() : 0; }
  int size() const { return r_.world ? r_.world->size() : 1; }
  std::vector<std::string> gather(const std::string& mine) const {
    return r_.world ? comm::all_gather_strings(*r_.world, mine) : std::vector<std::string>{mine};
  }
  std::int64_t broadcast(std::int64_t v) const {
    if (r_.world) r_.world->broadcast(&v, 1, 0);
    return v;
  }
  // Each rank's error (empty: none) or else its payload -> every rank throws E with the first error,
  // naming its rank; or every rank's payload, in rank order.
  template <class E>
  std::vector<std::string> agree(const std::string& error, const std::string& payload = {}) const {
    auto all = gather(error.empty() ? "O" + payload : "E" + error);
    for (std::size_t r = 0; r < all.size(); ++r)
      if (all[r][0] == 'E') throw E(size() > 1 ? "rank " + std::to_string(r) + ": " + all[r].substr(1) : all[r].substr(1));
    for (auto& a : all) a.erase(0, 1);
    return all;
  }

 private:
  CheckpointRanks r_;
};

// Runs f and returns its exception's message, or "" (the error then travels to the next agree()). A
// FormatError's own prefix is dropped: the loader throws its messages again as FormatErrors.
template <class F>
std::string attempt(F&& f) {
  try {
    f();
    return {};
  } catch (const FormatError& e) {
    const std::string m = e.what(), prefix = "moekit::FormatError: ";
    return m.rfind(prefix, 0) == 0 ? m.substr(prefix.size()) : m;
  } catch (const std::exception& e) {
    return e.what()[0] ? e.what() : "unknown error";
  }
}

// The full tensors this rank writes: its own whole ones (no copy: the vector stays empty and the
// tensor's own buffer is written), and its sliced ones assembled from the slice group (collective over
// it: every rank of a group calls this with the same sliced tensors).
inline std::vector<std::pair<const CheckpointTensor*, std::vector<float>>> assemble(const std::vector<CheckpointTensor>& ts,
                                                                                     comm::HostCommunicator* slices) {
  std::vector<std::pair<const CheckpointTensor*, std::vector<float>>> out;
  std::vector<const CheckpointTensor*> sliced;
  for (const auto& t : ts) {
    check_slice(t);
    if (t.slice_dim >= 0) sliced.push_back(&t);
    else if (t.writer) out.push_back({&t, {}});
  }
  std::int64_t n = std::int64_t(sliced.size());
  const int g = slices ? slices->size() : 1;
  std::vector<std::int64_t> counts(std::size_t(g), n);
  if (slices) slices->all_gather(&n, 1, counts.data());
  for (auto c : counts)
    if (c != n)
      throw ShapeError("checkpoint: the ranks of a slice group hold " + std::to_string(c) + " and " + std::to_string(n) +
                       " sliced tensors; they must hold the same ones");
  if (n == 0) return out;
  // Who holds which slice: (hash of the name, dim, begin, size) per tensor and rank.
  std::vector<std::int64_t> mine, all(std::size_t(4 * n * g));
  for (const auto* t : sliced)
    mine.insert(mine.end(), {std::int64_t(XXH3_64bits(t->name.data(), t->name.size()) >> 1), t->slice_dim, t->slice_begin, t->slice_size});
  if (slices) slices->all_gather(mine.data(), mine.size(), all.data());
  else all = mine;
  for (std::int64_t i = 0; i < n; ++i) {
    const CheckpointTensor& t = *sliced[std::size_t(i)];
    std::vector<std::int64_t> sizes(static_cast<std::size_t>(g));
    std::int64_t covered = 0, inner = t.numel() / std::max<std::int64_t>(1, t.slice_size);
    for (int r = 0; r < g; ++r) {
      const std::int64_t* m = &all[std::size_t(4 * (std::int64_t(r) * n + i))];
      if (m[0] != mine[std::size_t(4 * i)] || m[1] != t.slice_dim)
        throw ShapeError("checkpoint: rank " + std::to_string(r) + " of the slice group of '" + t.name +
                         "' holds another tensor or another dimension at that place");
      sizes[std::size_t(r)] = m[3] * inner;
      covered += m[3];
    }
    if (covered != t.shape[std::size_t(t.slice_dim)])
      throw ShapeError("checkpoint: the slices of '" + t.name + "' cover " + std::to_string(covered) + " of its " +
                       std::to_string(t.shape[std::size_t(t.slice_dim)]) + " along dimension " + std::to_string(t.slice_dim));
    std::vector<float> parts(std::size_t(inner * covered));
    if (slices) slices->all_gather_v(t.data, sizes.data(), parts.data());
    else std::copy_n(t.data, t.numel(), parts.data());
    if (!t.writer) continue;
    std::vector<float> full(std::size_t(t.full_numel()));
    std::int64_t at = 0;
    for (int r = 0; r < g; ++r) {
      CheckpointTensor piece = t;
      const std::int64_t* m = &all[std::size_t(4 * (std::int64_t(r) * n + i))];
      piece.slice_begin = m[2], piece.slice_size = m[3];
      check_slice(piece);
      place_part(piece, parts.data() + at, full.data());
      at += sizes[std::size_t(r)];
    }
    out.push_back({&t, std::move(full)});
  }
  return out;
}

// "model.safetensors", or with n writing ranks "model-0000i-of-0000n.safetensors" (1-based).
inline std::string shard_file(const std::string& stem, int i, int n) {
  if (n == 1) return stem + ".safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "-%05d-of-%05d.safetensors", i + 1, n);
  return stem + buf;
}

// Reads a small JSON file (at most 64 MiB: checked before reading it).
inline nlohmann::json read_json(const std::filesystem::path& p) {
  const std::string file = p.string();
  std::error_code ec;
  const auto size = std::filesystem::file_size(p, ec);
  if (ec) throw FormatError(file + ": missing");
  if (size > (std::uintmax_t(64) << 20)) throw FormatError(file + ": " + std::to_string(size) + " bytes, over the 64 MiB limit");
  std::ifstream in(p, std::ios::binary);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(file + ": not valid JSON (" + e.what() + ")");
  }
}

// The tensors of one set (model or optimizer) of the checkpoint in dir: name -> file, from the index,
// or from the one file's header when there is no index.
inline std::map<std::string, std::string> weight_map(const std::filesystem::path& dir, const std::string& stem) {
  std::map<std::string, std::string> m;
  const std::filesystem::path index = dir / (stem + ".safetensors.index.json");
  if (!std::filesystem::exists(index)) {
    const io::SafetensorsFile f = io::SafetensorsFile::open(dir / (stem + ".safetensors"));
    for (const auto& name : f.names()) m[name] = stem + ".safetensors";
    return m;
  }
  const nlohmann::json j = read_json(index);
  const std::string file = index.string();
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw FormatError(file + ": field 'weight_map' is missing or not an object");
  for (const auto& [name, f] : j["weight_map"].items()) {
    // A file name of this folder only: nothing an index says may reach outside it.
    if (!f.is_string() || f.get<std::string>().find('/') != std::string::npos || f.get<std::string>().find('\\') != std::string::npos ||
        f.get<std::string>().rfind(stem + "-", 0) != 0)
      throw FormatError(file + ": weight_map['" + name + "'] is " + f.dump() + ", not a file name " + stem + "-*.safetensors of the folder");
    m[name] = f.get<std::string>();
  }
  return m;
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
  // Collective over ranks.world: an I/O error on any rank throws std::runtime_error on every rank
  // (naming the rank) and leaves the checkpoints that were there.
  std::filesystem::path save(std::int64_t step, const CheckpointContent& c, const CheckpointRanks& ranks = {}) const {
    namespace fs = std::filesystem;
    const detail::CheckpointWorld world(ranks);
    const std::string name = name_of(step);
    const fs::path tmp = root_ / ("." + name + ".tmp-" + std::to_string(world.broadcast(pid())));
    const fs::path final_dir = root_ / name;
    world.agree<std::runtime_error>(world.rank() != 0 ? "" : detail::attempt([&] {
      fs::create_directories(root_);
      fs::remove_all(tmp);
      fs::create_directory(tmp);
    }));
    // The tensor files: each rank its own, after gathering its sliced tensors (collective over slices).
    nlohmann::json files = nlohmann::json::object();
    std::map<std::string, std::int64_t> totals;
    for (const auto& [stem, set] : {std::pair<std::string, const std::vector<CheckpointTensor>*>{"model", &c.model},
                                    std::pair<std::string, const std::vector<CheckpointTensor>*>{"optimizer", &c.optimizer}}) {
      std::vector<std::pair<const CheckpointTensor*, std::vector<float>>> full;
      std::string error = detail::attempt([&] { full = detail::assemble(*set, ranks.slices); });
      const auto writes = world.gather(full.empty() && world.rank() != 0 ? "0" : "1");  // rank 0 writes even an empty set
      int index = 0, writers = 0;  // this rank's file among the writers', and how many there are
      for (int r = 0; r < int(writes.size()); ++r)
        if (writes[std::size_t(r)] == "1") {
          if (r < world.rank()) ++index;
          ++writers;
        }
      const std::string file = detail::shard_file(stem, index, writers);
      std::string names;
      if (error.empty() && writes[std::size_t(world.rank())] == "1")
        error = detail::attempt([&] {
          io::SafetensorsWriter w;
          w.set_metadata("format", "moekit-checkpoint-" + std::to_string(kCheckpointFormat));
          for (const auto& [t, assembled] : full) {
            const std::span<const float> v = t->slice_dim < 0 ? std::span<const float>(t->data, std::size_t(t->full_numel())) : assembled;
            w.add_f32(t->name, t->shape, v);
            w.set_metadata("xxh3:" + t->name, checksum_hex({reinterpret_cast<const std::uint8_t*>(v.data()), v.size() * sizeof(float)}));
            names += t->name + "\n" + std::to_string(v.size() * sizeof(float)) + "\n";
          }
          w.write(tmp / file);  // temporary sibling, fsync, rename (io/safetensors_writer.hpp)
        });
      full.clear();
      // Every rank's error, or the tensors it wrote (name and bytes per line pair): rank 0 indexes them.
      const auto reports = world.agree<std::runtime_error>(error, names);
      nlohmann::json map = nlohmann::json::object();
      std::int64_t bytes = 0;
      for (int r = 0, i = 0; r < int(reports.size()); ++r) {
        if (writes[std::size_t(r)] != "1") continue;
        std::istringstream in(reports[std::size_t(r)]);
        std::string n, b;
        while (std::getline(in, n) && std::getline(in, b)) {
          if (map.contains(n))  // two ranks claim to be its writer: the caller's layout is wrong
            throw std::runtime_error("checkpoint: tensor '" + n + "' was written by two ranks (" + map[n].get<std::string>() + " and rank " +
                                     std::to_string(r) + "'s); exactly one rank must be its writer");
          map[n] = detail::shard_file(stem, i, writers), bytes += std::stoll(b);
        }
        ++i;
      }
      totals[stem] = std::int64_t(map.size());
      files[stem] = nlohmann::json::array();
      for (int i = 0; i < writers; ++i) files[stem].push_back(detail::shard_file(stem, i, writers));
      if (world.rank() == 0 && writers > 1)
        error = detail::attempt([&] {
          const std::string text = nlohmann::json{{"metadata", {{"total_size", bytes}}}, {"weight_map", map}}.dump(1) + "\n";
          io::detail::write_atomically(tmp / (stem + ".safetensors.index.json"),
                                       {{reinterpret_cast<const std::uint8_t*>(text.data()), text.size()}});
        });
      world.agree<std::runtime_error>(error);
    }
    // The commit: trainer.json, then the rename into place (rank 0).
    const std::vector<std::string> rank_states = world.gather(c.rank_state.dump());
    world.agree<std::runtime_error>(world.rank() != 0 ? "" : detail::attempt([&] {
      nlohmann::json rs = nlohmann::json::array();
      for (const auto& s : rank_states) rs.push_back(nlohmann::json::parse(s));
      nlohmann::json meta = {{"format", kCheckpointFormat}, {"moekit_version", kMoekitVersion}, {"step", step},
                             {"ranks", world.size()}, {"files", files}, {"model_tensors", totals["model"]},
                             {"optimizer_tensors", totals["optimizer"]}, {"state", c.state}, {"rank_states", rs}};
      const std::string text = meta.dump(1) + "\n";
      io::detail::write_atomically(tmp / "trainer.json", {{reinterpret_cast<const std::uint8_t*>(text.data()), text.size()}});
      detail::fsync_path(tmp);
      commit(tmp, final_dir, name);
      prune();
    }));
    return final_dir;
  }

  // Verifies the checkpoint in `dir` against `c` (trainer.json, the index, names, shapes, checksums),
  // then writes its tensors (this rank's parts of them) into c's buffers. Throws FormatError on every
  // rank, before writing anything, when something does not verify on any rank. Collective over ranks.
  static LoadedCheckpoint load(const std::filesystem::path& dir, const CheckpointContent& c, const CheckpointRanks& ranks = {}) {
    const detail::CheckpointWorld world(ranks);
    LoadedCheckpoint out;
    out.dir = dir;
    std::vector<std::vector<float>> staged;  // this rank's parts, in the order of c.model then c.optimizer
    std::map<std::string, std::string> all_names;  // every tensor of the checkpoint -> its file
    std::string claimed;                       // the tensors this rank is the writer of, one per line
    std::string error = detail::attempt([&] {
      const std::filesystem::path meta_path = dir / "trainer.json";
      const std::string file = meta_path.string();
      if (!std::filesystem::exists(meta_path)) throw FormatError(file + ": missing (the checkpoint was not completed)");
      const nlohmann::json meta = detail::read_json(meta_path);
      if (!meta.is_object() || !meta.contains("format") || !meta["format"].is_number_integer())
        throw FormatError(file + ": field 'format' is missing or not an integer");
      if (meta["format"].get<std::int64_t>() != kCheckpointFormat)
        throw FormatError(file + ": field 'format' is " + meta["format"].dump() + ", this moekit reads format " +
                          std::to_string(kCheckpointFormat));
      const auto step = step_of(dir.filename().string());
      if (!meta.contains("step") || !meta["step"].is_number_integer() || (step && meta["step"].get<std::int64_t>() != *step))
        throw FormatError(file + ": field 'step' is " + (meta.contains("step") ? meta["step"].dump() : std::string("missing")) +
                          ", the directory says " + (step ? std::to_string(*step) : std::string("no step")));
      out.step = meta["step"].get<std::int64_t>();
      if (!meta.contains("state")) throw FormatError(file + ": field 'state' is missing");
      out.state = meta["state"];
      if (!meta.contains("rank_states") || !meta["rank_states"].is_array() || meta["rank_states"].empty())
        throw FormatError(file + ": field 'rank_states' is missing or not a non-empty array");
      for (const auto& s : meta["rank_states"]) out.rank_states.push_back(s);
      struct Set {
        const char* stem;
        const std::vector<CheckpointTensor>* tensors;
        const char* count;
      };
      for (const Set& s : {Set{"model", &c.model, "model_tensors"}, Set{"optimizer", &c.optimizer, "optimizer_tensors"}}) {
        const std::string stem = s.stem, count = s.count;
        const auto map = detail::weight_map(dir, stem);
        if (!meta.contains(count) || !meta[count].is_number_integer() || meta[count].get<std::int64_t>() != std::int64_t(map.size()))
          throw FormatError(file + ": field '" + count + "' is " + (meta.contains(count) ? meta[count].dump() : std::string("missing")) +
                            ", the " + stem + " files hold " + std::to_string(map.size()) + " tensors");
        std::map<std::string, io::SafetensorsFile> opened;
        for (const auto& t : *s.tensors) {
          detail::check_slice(t);
          const auto at = map.find(t.name);
          if (at == map.end()) throw FormatError((dir / (stem + ".safetensors")).string() + ": tensor '" + t.name + "' is missing");
          auto f = opened.find(at->second);
          if (f == opened.end()) {
            f = opened.emplace(at->second, io::SafetensorsFile::open(dir / at->second)).first;
            for (const auto& n : f->second.names())  // the file holds what the index says, and no more
              if (map.find(n) == map.end() || map.at(n) != at->second)
                throw FormatError(f->second.source() + ": tensor '" + n + "' is not in the index's weight_map for this file");
          }
          staged.push_back(detail::verified_part(f->second, t));
          if (t.writer) claimed += stem + ":" + t.name + "\n";
        }
        for (const auto& [n, f] : map) all_names[stem + ":" + n] = f;
      }
    });
    // Every rank's verdict; then the tensors of the checkpoint that no rank holds (the same on every rank).
    const auto reports = world.agree<FormatError>(error, claimed);
    std::set<std::string> held;
    for (const auto& rep : reports) {
      std::istringstream in(rep);
      for (std::string n; std::getline(in, n);) held.insert(n);
    }
    for (const auto& [key, f] : all_names)
      if (!held.count(key)) throw FormatError((dir / f).string() + ": tensor '" + key.substr(key.find(':') + 1) + "' is not in the model");
    std::size_t i = 0;
    for (const auto* set : {&c.model, &c.optimizer})
      for (const auto& t : *set) std::copy(staged[i].begin(), staged[i].end(), t.data), ++i;
    for (const auto& f : c.after_load) f();
    return out;
  }

  // The newest checkpoint that verifies, loaded into c's buffers; `skipped` gets "DIR: why" for each
  // newer one that did not verify. Nothing when none does (the buffers are then untouched). Collective:
  // rank 0's listing is every rank's.
  std::optional<LoadedCheckpoint> load_newest(const CheckpointContent& c, std::vector<std::string>& skipped,
                                              const CheckpointRanks& ranks = {}) const {
    const detail::CheckpointWorld world(ranks);
    std::vector<std::int64_t> steps;
    for (const auto& [s, d] : list()) steps.push_back(s);
    const std::int64_t n = world.broadcast(std::int64_t(steps.size()));
    steps.resize(std::size_t(n));
    for (auto& s : steps) s = world.broadcast(s);
    for (const std::int64_t s : steps) {
      const auto dir = root_ / name_of(s);
      try {
        return load(dir, c, ranks);
      } catch (const FormatError& e) {
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
  // tmp -> final_dir. The same step again: the old one is moved aside first (rename cannot replace a
  // full folder), so for a moment there is no step-N, and a crash then leaves the previous steps.
  void commit(const std::filesystem::path& tmp, const std::filesystem::path& final_dir, const std::string& name) const {
    namespace fs = std::filesystem;
    if (fs::exists(final_dir)) {
      const fs::path old = root_ / ("." + name + ".old-" + std::to_string(pid()));
      fs::remove_all(old);
      fs::rename(final_dir, old);
      fs::rename(tmp, final_dir);
      fs::remove_all(old);
    } else {
      fs::rename(tmp, final_dir);
    }
    detail::fsync_path(root_);
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
