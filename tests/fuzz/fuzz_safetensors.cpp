// libFuzzer target: io::SafetensorsFile::parse on arbitrary bytes. Every input either parses (then
// every tensor's bytes and metadata are read) or throws moekit::FormatError; anything else (a crash,
// a sanitizer report, another exception, an allocation sized from the file beyond its length) fails.
#include <cstddef>
#include <cstdint>
#include <vector>

#include <moekit/io/safetensors.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto f = moekit::io::SafetensorsFile::parse(std::vector<std::uint8_t>(data, data + size), "fuzz.safetensors");
    std::size_t bytes = 0;
    for (const auto& n : f.names()) bytes += f.raw(n).size();
    for (const auto& [k, v] : f.metadata()) bytes += k.size() + v.size();
    if (bytes > size) __builtin_trap();  // tensors and metadata cannot hold more bytes than the file
  } catch (const moekit::FormatError&) {
  }
  return 0;
}
