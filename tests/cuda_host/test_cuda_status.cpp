// backend/cuda/status.cuh's error clearing, on the host without a GPU: this file defines the five CUDA
// runtime functions status.cuh calls (the executable does not link cudart), as a model of the runtime's
// documented per-thread "last error": every call that fails records its error, cudaGetLastError returns
// it and resets it, cudaPeekAtLastError only returns it. cudaStreamQuery's "not ready" is recorded too, as
// the real runtime may do (PyTorch clears it for that reason). The rules checked: an error that is thrown
// or returned is cleared, and a poll that saw "not ready" leaves nothing behind; an unrelated older error
// is not swallowed by a poll. On a GPU, tests/gpu/test_cuda_kernels.cu checks the same on the real runtime.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <moekit/backend/cuda/status.cuh>

namespace {
cudaError_t g_last = cudaSuccess;
int g_busy_polls = 0;  // cudaStreamQuery answers "not ready" this many more times
cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) g_last = e;
  return e;
}
cudaError_t fails_with(cudaError_t e) { return record(e); }  // a runtime call that failed
}  // namespace

extern "C" {
cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}
cudaError_t CUDARTAPI cudaPeekAtLastError(void) { return g_last; }
cudaError_t CUDARTAPI cudaStreamQuery(cudaStream_t) {
  if (g_busy_polls > 0) {
    --g_busy_polls;
    return record(cudaErrorNotReady);
  }
  return cudaSuccess;
}
const char* CUDARTAPI cudaGetErrorName(cudaError_t e) {
  return e == cudaErrorMemoryAllocation ? "cudaErrorMemoryAllocation" : e == cudaErrorNotReady ? "cudaErrorNotReady" : "cudaError";
}
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { return "(model)"; }
}

namespace mc = moekit::backend::cuda;

TEST_CASE("throw_on_error clears the error it throws") {
  g_last = cudaSuccess;
  CHECK_THROWS_AS(MOEKIT_CUDA_CHECK(fails_with(cudaErrorMemoryAllocation)), moekit::CudaError);
  CHECK(cudaPeekAtLastError() == cudaSuccess);
  try {
    MOEKIT_CUDA_CHECK(fails_with(cudaErrorMemoryAllocation));
  } catch (const moekit::CudaError& e) {
    CHECK(e.code() == cudaErrorMemoryAllocation);
    CHECK(std::string(e.what()).find("cudaErrorMemoryAllocation") != std::string::npos);
  }
  // An out-of-memory is a CudaError the launch layer reports as kOutOfMemory; other errors as kBackendError.
  std::string message;
  CHECK(moekit::status_of([] { MOEKIT_CUDA_CHECK(fails_with(cudaErrorMemoryAllocation)); }, message) ==
        moekit::Status::kOutOfMemory);
  CHECK(message.find("cudaErrorMemoryAllocation") != std::string::npos);
  CHECK(moekit::status_of([] { MOEKIT_CUDA_CHECK(fails_with(cudaErrorNotReady)); }, message) == moekit::Status::kBackendError);
  CHECK(cudaPeekAtLastError() == cudaSuccess);
  MOEKIT_CUDA_CHECK(cudaSuccess);  // success touches nothing
  CHECK(cudaPeekAtLastError() == cudaSuccess);
}

cudaError_t launcher_after_failed_call() {
  MOEKIT_CUDA_RETURN_IF_ERROR(fails_with(cudaErrorMemoryAllocation));
  return cudaGetLastError();
}
TEST_CASE("MOEKIT_CUDA_RETURN_IF_ERROR clears the error it returns") {
  g_last = cudaSuccess;
  CHECK(launcher_after_failed_call() == cudaErrorMemoryAllocation);
  CHECK(cudaPeekAtLastError() == cudaSuccess);
}

TEST_CASE("stream_query: polling a busy stream leaves no cudaErrorNotReady behind") {
  g_last = cudaSuccess;
  g_busy_polls = 3;
  int polls = 0;
  while (mc::stream_query(nullptr) == cudaErrorNotReady) {
    ++polls;
    CHECK(cudaPeekAtLastError() == cudaSuccess);
  }
  CHECK(polls == 3);
  CHECK(cudaGetLastError() == cudaSuccess);  // what the next launcher would return
  // The model is faithful: the raw call does leave it.
  g_busy_polls = 1;
  CHECK(cudaStreamQuery(nullptr) == cudaErrorNotReady);
  CHECK(cudaGetLastError() == cudaErrorNotReady);
}

TEST_CASE("stream_query does not swallow an older, unrelated error") {
  g_last = cudaErrorMemoryAllocation;  // nobody has read it yet
  g_busy_polls = 0;
  CHECK(mc::stream_query(nullptr) == cudaSuccess);
  CHECK(cudaPeekAtLastError() == cudaErrorMemoryAllocation);
  g_last = cudaSuccess;
}
