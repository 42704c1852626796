# NLopt (Debian libnlopt-cxx-dev, which brings libnlopt-dev): an optional dependency. Only
# science/fit.hpp and science/planner.hpp include it; moekit::science (the host target + NLopt) is what
# a user of those two headers links. Defines the imported target moekit::nlopt when NLopt is found, and
# prints nothing. NLopt's own two CMake packages (nlopt and nlopt_cxx) share one name, so the header and
# the C library are looked up directly instead.
#
# Included by moekit's CMakeLists.txt (which defines moekit::science over moekit::nlopt) and, installed
# next to it, by moekitConfig.cmake, so that a consumer of an installed moekit finds NLopt the same way
# (CMAKE_PREFIX_PATH, or MOEKIT_NLOPT_INCLUDE_DIR / MOEKIT_NLOPT_LIBRARY set by hand).
if(NOT TARGET moekit::nlopt)
  find_path(MOEKIT_NLOPT_INCLUDE_DIR nlopt.hpp)
  find_library(MOEKIT_NLOPT_LIBRARY nlopt)
  mark_as_advanced(MOEKIT_NLOPT_INCLUDE_DIR MOEKIT_NLOPT_LIBRARY)
  if(MOEKIT_NLOPT_INCLUDE_DIR AND MOEKIT_NLOPT_LIBRARY)
    add_library(moekit::nlopt INTERFACE IMPORTED)
    set_target_properties(moekit::nlopt PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${MOEKIT_NLOPT_INCLUDE_DIR}"
                                                   INTERFACE_LINK_LIBRARIES "${MOEKIT_NLOPT_LIBRARY}")
  endif()
endif()
