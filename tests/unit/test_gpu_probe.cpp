// tests/common/gpu_probe.hpp: when the gpu tests run, skip or fail, for every kind of answer the CUDA
// runtime gives (the values are what the runtime returns on such machines: driver 0 and
// cudaErrorInsufficientDriver without a driver, as on CI; 12040 against a 13000 runtime for an old driver).
#include <doctest/doctest.h>

#include "../common/gpu_probe.hpp"

using moekit_test::GpuProbe;
using moekit_test::probe_gpu;

TEST_CASE("gpu probe: a device runs, with or without MOEKIT_REQUIRE_GPU") {
  for (bool require : {false, true}) {
    const GpuProbe p = probe_gpu(13000, 13000, true, "cudaSuccess", 1, require);
    CHECK(p.action == GpuProbe::kRun);
    CHECK(p.exit_code() == 0);
  }
}

TEST_CASE("gpu probe: no driver or no device skips (77), unless a GPU is required") {
  struct Answer {
    int driver;
    bool ok;
    const char* error;
    int devices;
  };
  for (const Answer a : {Answer{0, false, "cudaErrorInsufficientDriver", 0}, Answer{13000, false, "cudaErrorNoDevice", 0},
                         Answer{13000, true, "cudaSuccess", 0}}) {
    CAPTURE(a.error);
    const GpuProbe skip = probe_gpu(a.driver, 13000, a.ok, a.error, a.devices, false);
    CHECK(skip.action == GpuProbe::kSkip);
    CHECK(skip.exit_code() == 77);
    const GpuProbe fail = probe_gpu(a.driver, 13000, a.ok, a.error, a.devices, true);
    CHECK(fail.action == GpuProbe::kFail);
    CHECK(fail.exit_code() == 1);
    CHECK(fail.why.find("MOEKIT_REQUIRE_GPU") != std::string::npos);
  }
}

TEST_CASE("gpu probe: a driver that cannot serve the runtime fails even without MOEKIT_REQUIRE_GPU") {
  const GpuProbe old = probe_gpu(12040, 13000, false, "cudaErrorInsufficientDriver", 0, false);
  CHECK(old.action == GpuProbe::kFail);
  CHECK(old.exit_code() == 1);
  CHECK(old.why.find("older than the runtime") != std::string::npos);
  CHECK(old.why.find("cudaErrorInsufficientDriver") != std::string::npos);
  const GpuProbe broken = probe_gpu(13000, 13000, false, "cudaErrorSystemDriverMismatch", 0, false);
  CHECK(broken.action == GpuProbe::kFail);
  CHECK(broken.why.find("older") == std::string::npos);
}

TEST_CASE("gpu probe: MOEKIT_REQUIRE_GPU is set by any value but empty or 0") {
  CHECK_FALSE(moekit_test::require_gpu(nullptr));
  CHECK_FALSE(moekit_test::require_gpu(""));
  CHECK_FALSE(moekit_test::require_gpu("0"));
  CHECK(moekit_test::require_gpu("1"));
  CHECK(moekit_test::require_gpu("yes"));
}
