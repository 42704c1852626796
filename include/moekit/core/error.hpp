#pragma once
#include <new>
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

// Marks an exception that reports an allocation that failed without being a std::bad_alloc (a device
// allocation: backend/cuda/status.cuh's CudaOutOfMemory), so that status_of reports Status::kOutOfMemory
// and a caller can retry smaller. Catch such errors by their own type; this is only a tag.
class OutOfMemoryTag {
 public:
  virtual ~OutOfMemoryTag() = default;
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

// Status codes of the launch layer (MoeLayer's can_implement / initialize / run_forward /
// run_backward, and the CUDA kernels' cudaError_t below them); the convenience layer throws instead.
enum class Status {
  kSuccess = 0,
  kInvalidConfig,      // ConfigError: a field violates a rule, or does not match the layer's policies
  kInvalidArgument,    // ShapeError: a tensor's shape, a null or misaligned pointer, too many tokens
  kWorkspaceTooSmall,  // fewer workspace bytes than workspace_bytes(tokens)
  kInvalidState,       // e.g. backward before forward
  kNumericError,       // NumericError: non-finite router logits (on this or another rank)
  kOutOfMemory,        // an allocation failed
  kBackendError,       // CUDA, cuBLAS, NCCL or MPI failed (the message names the call)
};

inline const char* to_string(Status s) {
  switch (s) {
    case Status::kSuccess: return "success";
    case Status::kInvalidConfig: return "invalid config";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kWorkspaceTooSmall: return "workspace too small";
    case Status::kInvalidState: return "invalid state";
    case Status::kNumericError: return "numeric error";
    case Status::kOutOfMemory: return "out of memory";
    case Status::kBackendError: return "backend error";
  }
  return "unknown status";
}

// Runs f() and returns kSuccess, or the status of the exception it threw with its message in `message`:
// how the launch layer reports what the convenience layer below it throws, never letting one escape.
template <class F>
Status status_of(F&& f, std::string& message) noexcept {
  try {
    f();
    message.clear();
    return Status::kSuccess;
  } catch (const ConfigError& e) {
    message = e.what();
    return Status::kInvalidConfig;
  } catch (const ShapeError& e) {
    message = e.what();
    return Status::kInvalidArgument;
  } catch (const NumericError& e) {
    message = e.what();
    return Status::kNumericError;
  } catch (const std::invalid_argument& e) {
    message = e.what();
    return Status::kInvalidArgument;
  } catch (const std::bad_alloc& e) {
    message = e.what();
    return Status::kOutOfMemory;
  } catch (const std::logic_error& e) {
    message = e.what();
    return Status::kInvalidState;
  } catch (const std::exception& e) {
    message = e.what();
    return dynamic_cast<const OutOfMemoryTag*>(&e) ? Status::kOutOfMemory : Status::kBackendError;
  } catch (...) {
    message = "unknown exception";
    return Status::kBackendError;
  }
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
