# cmake -P script run by ctest (fixture setup): install moekit's build tree into a fresh prefix and check
# that the package files are there.
#   MOEKIT_BINARY_DIR  moekit's build directory;  PREFIX  the prefix (removed first);  CONFIG  build type
#   INCLUDEDIR  CMAKE_INSTALL_INCLUDEDIR of that build
file(REMOVE_RECURSE ${PREFIX})
set(install_args --install ${MOEKIT_BINARY_DIR} --prefix ${PREFIX})
if(CONFIG)
  list(APPEND install_args --config ${CONFIG})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} ${install_args} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()

file(GLOB_RECURSE config_files ${PREFIX}/*/moekitConfig.cmake)
if(NOT config_files)
  message(FATAL_ERROR "no moekitConfig.cmake under ${PREFIX}")
endif()
list(GET config_files 0 config_file)
get_filename_component(config_dir ${config_file} DIRECTORY)
foreach(file IN ITEMS moekitConfigVersion.cmake moekitTargets.cmake FindNCCL.cmake moekitNlopt.cmake)
  if(NOT EXISTS ${config_dir}/${file})
    message(FATAL_ERROR "${file} is missing next to ${config_file}")
  endif()
endforeach()
if(NOT EXISTS ${PREFIX}/${INCLUDEDIR}/moekit/moe_layer.hpp)
  message(FATAL_ERROR "headers are missing under ${PREFIX}/${INCLUDEDIR}/moekit")
endif()
message(STATUS "moekit installed into ${PREFIX}; package files in ${config_dir}")
