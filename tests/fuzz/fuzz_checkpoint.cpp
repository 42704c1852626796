// libFuzzer target: train::CheckpointDir::load on a checkpoint folder made from the input. The input
// is split at 0xFF 0x00 separators into trainer.json, a tensor file and, when there is a third part,
// an index: then the tensor file is model-00001-of-00001.safetensors and the third part
// model.safetensors.index.json (the sharded layout), else it is model.safetensors.
// optimizer.safetensors is a valid empty file. Every input either loads (the expected tensor was
// found whole) or throws moekit::FormatError naming what is wrong, and the buffer is untouched unless
// it loaded.
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <moekit/train/checkpoint.hpp>

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const fs::path dir = fs::temp_directory_path() / ("moekit_fuzz_ckpt_" + std::to_string(::getpid())) / "step-000007";
  static bool made = [] {
    fs::create_directories(dir);
    moekit::io::SafetensorsWriter().write(dir / "optimizer.safetensors");
    return true;
  }();
  (void)made;
  std::vector<std::string> parts(1);
  for (std::size_t i = 0; i < size; ++i) {
    if (parts.size() < 3 && i + 1 < size && data[i] == 0xFF && data[i + 1] == 0x00) {
      parts.emplace_back();
      ++i;
      continue;
    }
    parts.back().push_back(char(data[i]));
  }
  parts.resize(std::max<std::size_t>(parts.size(), 2));
  auto put = [](const fs::path& p, const std::string& bytes) { std::ofstream(p, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size())); };
  put(dir / "trainer.json", parts[0]);
  std::error_code ec;
  for (const char* f : {"model.safetensors", "model-00001-of-00001.safetensors", "model.safetensors.index.json"}) fs::remove(dir / f, ec);
  if (parts.size() == 3) {
    put(dir / "model-00001-of-00001.safetensors", parts[1]);
    put(dir / "model.safetensors.index.json", parts[2]);
  } else {
    put(dir / "model.safetensors", parts[1]);
  }
  std::vector<float> w(6, -7.f);
  moekit::train::CheckpointContent c{{{"w", {2, 3}, w.data()}}, {}, {}, {}, {}, {}};
  try {
    (void)moekit::train::CheckpointDir::load(dir, c);
  } catch (const moekit::FormatError&) {
    for (float v : w)
      if (v != -7.f) __builtin_trap();  // a failed load wrote the buffer
  }
  return 0;
}
