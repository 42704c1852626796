# cmake -P script run by ctest: compiling SOURCE must fail, with a diagnostic that contains the text on
# its first line ("// expect: <text>"). This is how a misuse of moekit's policies is reported to users.
#   CXX  the C++ compiler (GCC or Clang);  INCLUDE_DIR  moekit's include directory;  SOURCE  the case
file(STRINGS ${SOURCE} expect_line LIMIT_COUNT 1 REGEX "^// expect: ")
if(NOT expect_line)
  message(FATAL_ERROR "${SOURCE} has no '// expect: <text>' first line")
endif()
string(REGEX REPLACE "^// expect: " "" expect "${expect_line}")

execute_process(COMMAND ${CXX} -std=c++20 -fsyntax-only -I${INCLUDE_DIR} ${SOURCE}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must not")
endif()
string(FIND "${out}${err}" "${expect}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "${SOURCE} failed to compile, but without the expected diagnostic\n"
                      "  expected: ${expect}\n  got:\n${out}${err}")
endif()
message(STATUS "${SOURCE}: rejected with \"${expect}\"")
