# NLopt (Debian libnlopt-cxx-dev, which brings libnlopt-dev): an optional dependency. Only
# science/fit.hpp and science/planner.hpp include it, and only moekit-plan and the science tests build
# on them. Defines the target moekit_nlopt when found; NLopt's own two CMake packages (nlopt and
# nlopt_cxx) share one name, so the header and the C library are looked up directly instead.
if(NOT TARGET moekit_nlopt)
  find_path(MOEKIT_NLOPT_INCLUDE_DIR nlopt.hpp)
  find_library(MOEKIT_NLOPT_LIBRARY nlopt)
  if(MOEKIT_NLOPT_INCLUDE_DIR AND MOEKIT_NLOPT_LIBRARY)
    add_library(moekit_nlopt INTERFACE IMPORTED)
    set_target_properties(moekit_nlopt PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${MOEKIT_NLOPT_INCLUDE_DIR}"
                                                  INTERFACE_LINK_LIBRARIES "${MOEKIT_NLOPT_LIBRARY}")
    message(STATUS "moekit: NLopt found (${MOEKIT_NLOPT_LIBRARY}): moekit-plan and the science tests are built")
  else()
    message(STATUS "moekit: NLopt not found: moekit-plan and the science tests are not built (Debian: libnlopt-cxx-dev)")
  endif()
endif()
