#pragma once
// Host/device annotation: the same function compiles under g++ and nvcc (as Eigen's EIGEN_DEVICE_FUNC).
#ifndef MOEKIT_HD
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOEKIT_HD __host__ __device__ __forceinline__
#else
#define MOEKIT_HD inline
#endif
#endif

#ifndef MOEKIT_RESTRICT
#define MOEKIT_RESTRICT __restrict__
#endif
