// Links moekit::cuda from a plain C++ file (no CUDA language): the CUDA runtime, cuBLAS and, when moekit
// found it, NCCL resolve. Runs without a GPU: it only asks versions and the device count.
#include <cstdio>
#include <string>

#include <cublas_v2.h>
#include <cuda_runtime.h>
#ifdef MOEKIT_HAS_NCCL
#include <nccl.h>
#endif

#include <moekit/core/macros.hpp>  // moekit's include directory comes with moekit::cuda

int main() {
  int runtime = 0, devices = 0, cublas_major = -1;
  cudaRuntimeGetVersion(&runtime);
  const cudaError_t err = cudaGetDeviceCount(&devices);
  cublasGetProperty(MAJOR_VERSION, &cublas_major);
  std::printf("moekit::cuda probe: CUDA runtime %d, cuBLAS %d, devices: %s\n", runtime, cublas_major,
              err == cudaSuccess ? std::to_string(devices).c_str() : cudaGetErrorString(err));
#ifdef MOEKIT_HAS_NCCL
  int nccl = 0;
  if (ncclGetVersion(&nccl) != ncclSuccess) {
    std::fprintf(stderr, "ncclGetVersion failed\n");
    return 1;
  }
  std::printf("moekit::cuda probe: NCCL %d\n", nccl);
#endif
  return runtime > 0 && cublas_major > 0 ? 0 : 1;
}
