#pragma once
// Routing records of router replay (router/replay.hpp) as safetensors: one int32 tensor
// "layers.{l}.topk.indices" [T, k] per MoE layer of a model, −1 for a slot with no expert. Needs
// nlohmann_json, as the other io/ headers.
#include <cstdint>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/io/safetensors_writer.hpp"

namespace moekit::io {

// A layer's record: the experts of each token's k slots, −1 for none.
struct RoutingRecord {
  std::int64_t tokens = 0, k = 0;
  std::vector<std::int32_t> indices;  // [tokens, k]
};

// Records of the MoE layers of a model, one tensor "layers.{l}.topk.indices" [T, k] each, written
// atomically (a crash leaves the old file or the new one, never half of it).
inline void save_routing_records(const std::filesystem::path& path, const std::vector<RoutingRecord>& records) {
  SafetensorsWriter w;
  w.set_metadata("format", "moekit-routing-record");
  w.set_metadata("layers", std::to_string(records.size()));
  for (std::size_t l = 0; l < records.size(); ++l)
    w.add_i32("layers." + std::to_string(l) + ".topk.indices", {records[l].tokens, records[l].k}, records[l].indices);
  w.write(path);
}
// Reads them back: FormatError on a file that is not a record (its format, a missing layer, a tensor of
// another dtype or rank); values are checked when a layer replays them.
inline std::vector<RoutingRecord> load_routing_records(const std::filesystem::path& path) {
  const SafetensorsFile f = read_safetensors(path);
  const auto& meta = f.metadata();
  const auto format = meta.find("format"), layers = meta.find("layers");
  if (format == meta.end() || format->second != "moekit-routing-record" || layers == meta.end())
    throw FormatError(path.string() + ": not a routing record (metadata \"format\": \"moekit-routing-record\" and \"layers\" expected)");
  std::size_t n = 0;
  try {
    n = std::stoul(layers->second);
  } catch (const std::exception&) {
    throw FormatError(path.string() + ": metadata \"layers\" = \"" + layers->second + "\" is not a count");
  }
  if (f.size() != n) throw FormatError(path.string() + ": " + std::to_string(f.size()) + " tensors for " + std::to_string(n) + " layers");
  std::vector<RoutingRecord> out(n);
  for (std::size_t l = 0; l < n; ++l) {
    const std::string name = "layers." + std::to_string(l) + ".topk.indices";
    const TensorInfo& info = f.info(name);
    if (info.shape.size() != 2) throw FormatError(path.string() + ": tensor '" + name + "' must be [tokens, k]");
    out[l].tokens = info.shape[0], out[l].k = info.shape[1];
    out[l].indices = f.get_i32(name, info.shape);
  }
  return out;
}

}  // namespace moekit::io
