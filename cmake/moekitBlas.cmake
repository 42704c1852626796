# moekit::blas, the CBLAS the host backend links. Included by moekit's CMakeLists.txt and by its
# installed package config, so a consumer gets the same choice.
#
# Default (MOEKIT_BLAS=auto): OpenBLAS built on OpenMP when the machine has it (Debian's
# libopenblas0-openmp, which tools/install-deps.sh installs), so that the host backend's OpenMP loops
# and the BLAS calls share one thread pool and one wait policy. Debian's default OpenBLAS runs its
# own pthreads, whose workers spin between calls; beside another busy process on a small machine,
# they and the OpenMP workers contend for the cores (docs/benchmarks.md, "Beside a busy process").
# MOEKIT_BLAS=system (or a BLA_VENDOR of your own): whatever find_package(BLAS) finds.
if(TARGET moekit::blas)
  return()
endif()
set(MOEKIT_BLAS "auto" CACHE STRING "moekit's CBLAS: auto (OpenBLAS on OpenMP when present, else FindBLAS) or system (FindBLAS)")
set_property(CACHE MOEKIT_BLAS PROPERTY STRINGS auto system)
if(MOEKIT_BLAS STREQUAL "auto" AND NOT DEFINED BLA_VENDOR)
  find_library(MOEKIT_OPENBLAS_OPENMP_LIBRARY NAMES openblas libopenblas.so.0
               PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp /usr/lib64/openblas-openmp NO_DEFAULT_PATH)
endif()
add_library(moekit::blas INTERFACE IMPORTED)
if(MOEKIT_BLAS STREQUAL "auto" AND NOT DEFINED BLA_VENDOR AND MOEKIT_OPENBLAS_OPENMP_LIBRARY)
  # A full path: CMake records its directory in the binaries' run path, so they load this variant
  # and not the system's default libopenblas.so.0.
  set_target_properties(moekit::blas PROPERTIES INTERFACE_LINK_LIBRARIES "${MOEKIT_OPENBLAS_OPENMP_LIBRARY}")
  set(MOEKIT_BLAS_CHOSEN "OpenBLAS on OpenMP (${MOEKIT_OPENBLAS_OPENMP_LIBRARY})")
else()
  find_package(BLAS REQUIRED)
  set_target_properties(moekit::blas PROPERTIES INTERFACE_LINK_LIBRARIES BLAS::BLAS)
  set(MOEKIT_BLAS_CHOSEN "FindBLAS (${BLAS_LIBRARIES})")
endif()
# backend::Host<bf16> loads oneDNN (libdnnl.so.2), the host's SwiGLU glibc's libmvec, at run time with
# dlopen: no build dependency.
if(CMAKE_DL_LIBS)
  set_property(TARGET moekit::blas APPEND PROPERTY INTERFACE_LINK_LIBRARIES ${CMAKE_DL_LIBS})
endif()
