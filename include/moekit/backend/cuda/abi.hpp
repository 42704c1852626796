#pragma once
// The architecture tag of a translation unit (as CUB's): everything of the CUDA backend, kernels and
// layer code alike, lives in an inline namespace named after the architectures the TU is built for
// (nvcc's __CUDA_ARCH_LIST__, e.g. 800,900 -> sm_800_900), and backend::Cuda<T> carries the tag as a
// default template argument, so MoeLayer<backend::Cuda<T>, ...> is a different type, with different
// symbols, in TUs built for different architectures: the linker never keeps one TU's copy for another.
// Callers name moekit::backend::cuda::f and backend::Cuda<T> as usual. Plain C++: no CUDA headers.
#define MOEKIT_CAT2_(a, b) a##b
#define MOEKIT_CAT_(a, b) MOEKIT_CAT2_(a, b)
#define MOEKIT_NARGS_I_(a1, a2, a3, a4, a5, a6, a7, a8, N, ...) N
#define MOEKIT_NARGS_(...) MOEKIT_NARGS_I_(__VA_ARGS__, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define MOEKIT_ARCH_1(a) MOEKIT_CAT_(_, a)
#define MOEKIT_ARCH_2(a, b) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_1(b))
#define MOEKIT_ARCH_3(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_2(__VA_ARGS__))
#define MOEKIT_ARCH_4(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_3(__VA_ARGS__))
#define MOEKIT_ARCH_5(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_4(__VA_ARGS__))
#define MOEKIT_ARCH_6(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_5(__VA_ARGS__))
#define MOEKIT_ARCH_7(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_6(__VA_ARGS__))
#define MOEKIT_ARCH_8(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_7(__VA_ARGS__))
#define MOEKIT_ARCHS_(...) MOEKIT_CAT_(MOEKIT_ARCH_, MOEKIT_NARGS_(__VA_ARGS__))(__VA_ARGS__)
#ifndef MOEKIT_CUDA_ABI
#ifdef __CUDA_ARCH_LIST__
#define MOEKIT_CUDA_ABI MOEKIT_CAT_(sm, MOEKIT_ARCHS_(__CUDA_ARCH_LIST__))
#else
#define MOEKIT_CUDA_ABI sm_unknown
#endif
#endif

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {
struct Abi {};  // the tag type of this TU's architectures
}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
