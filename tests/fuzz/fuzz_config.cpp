// libFuzzer target: the JSON layer config as moekit-layer reads it (nlohmann parse, then
// read_config_fields and MoeConfig::validate). Every input is accepted or rejected with a
// ConfigError (or a JSON parse error); nothing else may escape.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include <moekit/io/config_json.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(std::string(reinterpret_cast<const char*>(data), size));
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
  if (!j.is_object()) return 0;
  try {
    moekit::MoeConfig c;
    moekit::read_config_fields(j, c, moekit::FieldScope::kLayer);
    c.validate();
    nlohmann::json back;
    moekit::write_config_fields(c, back, moekit::FieldScope::kLayer);  // a valid config writes back
  } catch (const moekit::ConfigError&) {
  }
  return 0;
}
