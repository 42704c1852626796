# FindNCCL
# --------
# Finds NVIDIA's NCCL (header nccl.h, library libnccl.so or libnccl.so.2).
#
# Searched, in order: NCCL_ROOT (CMake or environment variable), NCCL_HOME / NCCL_DIR (environment),
# the CUDA toolkit found by find_package(CUDAToolkit) (or CUDAToolkit_ROOT / CUDA_PATH / /usr/local/cuda)
# with its `lib/` as well as `lib64/` (some toolkits ship NCCL under lib/ only), then the system dirs.
#
# Result variables:
#   NCCL_FOUND, NCCL_INCLUDE_DIRS, NCCL_LIBRARIES,
#   NCCL_VERSION (MAJOR.MINOR.PATCH from nccl.h), NCCL_VERSION_MAJOR, NCCL_VERSION_MINOR,
#   NCCL_VERSION_PATCH, NCCL_VERSION_CODE
# Imported target:
#   NCCL::NCCL
# Cache variables: NCCL_INCLUDE_DIR, NCCL_LIBRARY.
#
# Works with find_package(NCCL [version] [REQUIRED|QUIET]); it does not require the CUDA language.

set(_nccl_hints)
foreach(_nccl_root IN ITEMS "${NCCL_ROOT}" "$ENV{NCCL_ROOT}" "$ENV{NCCL_HOME}" "$ENV{NCCL_DIR}")
  if(_nccl_root)
    list(APPEND _nccl_hints "${_nccl_root}")
  endif()
endforeach()

set(_nccl_cuda_hints)
if(CUDAToolkit_LIBRARY_ROOT)
  list(APPEND _nccl_cuda_hints "${CUDAToolkit_LIBRARY_ROOT}")
endif()
if(CUDAToolkit_BIN_DIR)
  get_filename_component(_nccl_cuda_root "${CUDAToolkit_BIN_DIR}" DIRECTORY)
  list(APPEND _nccl_cuda_hints "${_nccl_cuda_root}")
endif()
if(CUDAToolkit_TARGET_DIR)
  list(APPEND _nccl_cuda_hints "${CUDAToolkit_TARGET_DIR}")
endif()
foreach(_nccl_root IN ITEMS "${CUDAToolkit_ROOT}" "$ENV{CUDAToolkit_ROOT}" "$ENV{CUDA_PATH}" "$ENV{CUDA_HOME}"
                            /usr/local/cuda)
  if(_nccl_root)
    list(APPEND _nccl_cuda_hints "${_nccl_root}")
  endif()
endforeach()
list(REMOVE_DUPLICATES _nccl_cuda_hints)

find_path(NCCL_INCLUDE_DIR
  NAMES nccl.h
  HINTS ${_nccl_hints} ${_nccl_cuda_hints} ${CUDAToolkit_INCLUDE_DIRS}
  PATH_SUFFIXES include
  DOC "Directory holding nccl.h")

# "nccl" finds libnccl.so; libnccl.so.2 alone is what the runtime-only packages ship.
find_library(NCCL_LIBRARY
  NAMES nccl libnccl.so.2
  HINTS ${_nccl_hints} ${_nccl_cuda_hints} ${CUDAToolkit_LIBRARY_DIR}
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu lib/aarch64-linux-gnu lib/sbsa-linux-gnu
  DOC "Path to libnccl.so")

unset(NCCL_VERSION)
if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_version_lines
       REGEX "^#define[ \t]+NCCL_(MAJOR|MINOR|PATCH|VERSION_CODE)[ \t]+[0-9]+")
  foreach(_nccl_part IN ITEMS MAJOR MINOR PATCH VERSION_CODE)
    set(_nccl_value "")
    foreach(_nccl_line IN LISTS _nccl_version_lines)
      if(_nccl_line MATCHES "^#define[ \t]+NCCL_${_nccl_part}[ \t]+([0-9]+)")
        set(_nccl_value "${CMAKE_MATCH_1}")
      endif()
    endforeach()
    if(_nccl_part STREQUAL "VERSION_CODE")
      set(NCCL_VERSION_CODE "${_nccl_value}")
    else()
      set(NCCL_VERSION_${_nccl_part} "${_nccl_value}")
    endif()
  endforeach()
  if(NOT NCCL_VERSION_MAJOR STREQUAL "" AND NOT NCCL_VERSION_MINOR STREQUAL "" AND NOT NCCL_VERSION_PATCH STREQUAL "")
    set(NCCL_VERSION "${NCCL_VERSION_MAJOR}.${NCCL_VERSION_MINOR}.${NCCL_VERSION_PATCH}")
  endif()
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL
  REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR
  VERSION_VAR NCCL_VERSION)

if(NCCL_FOUND)
  set(NCCL_INCLUDE_DIRS "${NCCL_INCLUDE_DIR}")
  set(NCCL_LIBRARIES "${NCCL_LIBRARY}")
  if(NOT TARGET NCCL::NCCL)
    add_library(NCCL::NCCL UNKNOWN IMPORTED)
    set_target_properties(NCCL::NCCL PROPERTIES
      IMPORTED_LOCATION "${NCCL_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
  endif()
endif()
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)

unset(_nccl_hints)
unset(_nccl_cuda_hints)
unset(_nccl_cuda_root)
unset(_nccl_root)
unset(_nccl_version_lines)
unset(_nccl_line)
unset(_nccl_part)
unset(_nccl_value)
