#pragma once
// Whether the gpu tests run, are skipped (exit 77, ctest's SKIP_RETURN_CODE) or fail before any test, from
// what the CUDA runtime answered. Plain C++ (no CUDA types) so that a host unit test checks every row:
//   a device                                   -> run
//   no driver at all (cudaDriverGetVersion 0), -> skip: a machine without a GPU (CI);
//   or no device (cudaErrorNoDevice, count 0)     with MOEKIT_REQUIRE_GPU set: fail (the device script)
//   a driver, but cudaGetDeviceCount failed    -> fail, always: a driver older than the runtime, or a
//                                                 broken install, on a machine that has a GPU must not
//                                                 look like a green, skipped suite
#include <cstdlib>
#include <string>

namespace moekit_test {

struct GpuProbe {
  enum Action { kRun, kSkip, kFail };
  Action action = kFail;
  std::string why;
  int exit_code() const { return action == kSkip ? 77 : action == kFail ? 1 : 0; }
};

// driver_version: cudaDriverGetVersion's (0: no driver installed); runtime_version: cudaRuntimeGetVersion's;
// count_ok: cudaGetDeviceCount returned cudaSuccess, else error_name is its cudaGetErrorName;
// require: MOEKIT_REQUIRE_GPU is set (require_gpu below).
inline GpuProbe probe_gpu(int driver_version, int runtime_version, bool count_ok, const std::string& error_name, int devices,
                          bool require) {
  const std::string versions =
      " (driver supports CUDA " + std::to_string(driver_version) + ", runtime " + std::to_string(runtime_version) + ")";
  if (count_ok && devices > 0) return {GpuProbe::kRun, std::to_string(devices) + " device(s)" + versions};
  const bool no_driver = driver_version == 0;
  const bool no_device = (count_ok && devices <= 0) || error_name == "cudaErrorNoDevice";
  if (no_driver || no_device) {
    const std::string what = no_driver ? "no CUDA driver is installed" : "the driver sees no CUDA device";
    if (require) return {GpuProbe::kFail, what + versions + ", but MOEKIT_REQUIRE_GPU demands a GPU"};
    return {GpuProbe::kSkip, what + versions + "; skipping (MOEKIT_REQUIRE_GPU=1 makes this a failure)"};
  }
  std::string why = "a CUDA driver is installed but cudaGetDeviceCount failed with " + error_name + versions;
  if (driver_version < runtime_version) why += ": the driver is older than the runtime these tests were built with";
  return {GpuProbe::kFail, why};
}

// MOEKIT_REQUIRE_GPU set to anything but "" or "0".
inline bool require_gpu(const char* env = std::getenv("MOEKIT_REQUIRE_GPU")) {
  return env && *env && std::string(env) != "0";
}

}  // namespace moekit_test
