# ctest train_lm.common_licenses: concatenates Debian's licence texts (/usr/share/common-licenses, on
# every Debian machine; symlinks to the same text are read once) into OUT and trains on it:
#   cmake -DEXE=train_lm -DOUT=file.txt "-DARGS=flags" -P learn_text_test.cmake
cmake_minimum_required(VERSION 3.20)  # IN_LIST, REAL_PATH
file(GLOB _files LIST_DIRECTORIES false /usr/share/common-licenses/*)
list(SORT _files)
file(WRITE ${OUT} "")
set(_seen "")
foreach(f IN LISTS _files)
  file(REAL_PATH ${f} _real)
  if(NOT _real IN_LIST _seen AND NOT IS_DIRECTORY ${_real})
    list(APPEND _seen ${_real})
    file(READ ${_real} _text)
    file(APPEND ${OUT} "${_text}")
  endif()
endforeach()
file(SIZE ${OUT} _size)
message(STATUS "${OUT}: ${_size} bytes from ${_files}")
execute_process(COMMAND ${EXE} --data ${OUT} ${ARGS} RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "train_lm --data ${OUT} exited ${_rc}")
endif()
