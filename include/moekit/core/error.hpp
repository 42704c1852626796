#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace moekit {

// Invalid configuration: the message names the field, the value and the rule.
class ConfigError : public std::invalid_argument {
 public:
  ConfigError(const std::string& field, const std::string& value, const std::string& rule)
      : std::invalid_argument("moekit::ConfigError: " + field + " = " + value + " violates: " + rule),
        field_(field) {}
  const std::string& field() const noexcept { return field_; }

 private:
  std::string field_;
};

// A tensor whose shape or layout does not match what the call needs.
class ShapeError : public std::invalid_argument {
 public:
  explicit ShapeError(const std::string& what) : std::invalid_argument("moekit::ShapeError: " + what) {}
};

// A loss or value that became NaN/Inf.
class NumericError : public std::runtime_error {
 public:
  explicit NumericError(const std::string& what) : std::runtime_error("moekit::NumericError: " + what) {}
};

// A file (checkpoint, safetensors) that is malformed, truncated or lacks what was asked for.
class FormatError : public std::runtime_error {
 public:
  explicit FormatError(const std::string& what) : std::runtime_error("moekit::FormatError: " + what) {}
};

// Status codes for the launch layer; the convenience layer turns them into exceptions.
enum class Status { kSuccess = 0, kInvalidArgument, kWorkspaceTooSmall, kBackendError };

inline const char* to_string(Status s) {
  switch (s) {
    case Status::kSuccess: return "success";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kWorkspaceTooSmall: return "workspace too small";
    case Status::kBackendError: return "backend error";
  }
  return "unknown status";
}

namespace detail {
template <class T>
std::string str(const T& v) {
  std::ostringstream os;
  os << v;
  return os.str();
}
}  // namespace detail

}  // namespace moekit
