# cmake -DEXE=plot_run -DDATA=testdata "-DARGS=a;b" -DEXPECT=regex -P check_error.cmake
# plot_run must exit 2 and say EXPECT on stderr. @DATA@ in ARGS is the testdata folder.
cmake_minimum_required(VERSION 3.25)
string(REPLACE "@DATA@" "${DATA}" args "${ARGS}")
execute_process(COMMAND ${EXE} --out ${CMAKE_CURRENT_BINARY_DIR}/plot_run_error_out ${args}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 2)
  message(FATAL_ERROR "plot_run ${args}: exit ${rc}, expected 2\nstdout: ${out}\nstderr: ${err}")
endif()
if(NOT err MATCHES "${EXPECT}")
  message(FATAL_ERROR "plot_run ${args}: stderr does not match '${EXPECT}':\n${err}")
endif()
message(STATUS "exit 2 as expected: ${err}")
