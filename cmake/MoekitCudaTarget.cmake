# For moekit's own CUDA tests, examples and benchmarks (not installed, not used by the library targets).
#
#   moekit_cuda_target(<target>)
#
# Call after enable_language(CUDA) on a target with .cu sources that links moekit::cuda:
# - C++20 for CUDA. CMake 3.25 does not know that nvcc 13 takes C++20 (cuda_std_20 is missing from
#   CMAKE_CUDA_COMPILE_FEATURES) and would compile at nvcc's default standard, so pass -std=c++20 then.
# - The shared CUDA runtime: moekit::cuda links CUDA::cudart, so CMake's default static runtime would put
#   a second copy of the runtime in the process.
# Architectures come from CMAKE_CUDA_ARCHITECTURES (the presets set it), never from here.
function(moekit_cuda_target target)
  if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    target_compile_features(${target} PRIVATE cuda_std_20)
  else()
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  endif()
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Shared)
endfunction()
