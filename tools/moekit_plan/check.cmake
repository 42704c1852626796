# cmake -DEXE=moekit-plan "-DARGS=a;b" -DRC=2 -DEXPECT=regex [-DDATA=testdata] [-DOUT=dir] -P check.cmake
# Runs moekit-plan, requires exit status RC and EXPECT to match its stdout + stderr. @DATA@ and @OUT@ in
# ARGS are replaced by the testdata folder and a scratch folder.
cmake_minimum_required(VERSION 3.25)
string(REPLACE "@DATA@" "${DATA}" args "${ARGS}")
string(REPLACE "@OUT@" "${OUT}" args "${args}")
if(OUT)
  file(MAKE_DIRECTORY ${OUT})
endif()
execute_process(COMMAND ${EXE} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL RC)
  message(FATAL_ERROR "moekit-plan ${args}: exit ${rc}, expected ${RC}\nstdout: ${out}\nstderr: ${err}")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "moekit-plan ${args}: output does not match '${EXPECT}':\nstdout: ${out}\nstderr: ${err}")
endif()
message(STATUS "exit ${rc} as expected: ${out}${err}")
