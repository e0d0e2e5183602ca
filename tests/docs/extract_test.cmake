# cmake -DSOURCE_DIR=... -DWORK_DIR=... -P extract_test.cmake
# Given tests/docs/fixture.md, when its blocks are extracted, then exactly the cpp and c blocks come
# out, named after their opening fence's line, with a #line directive and their exact text.
include(${SOURCE_DIR}/cmake/doc_snippets.cmake)
set(md ${SOURCE_DIR}/tests/docs/fixture.md)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(got "")
hmmkit_extract_snippets(${md} ${WORK_DIR} got)

set(want ${WORK_DIR}/fixture.md-L3.cpp ${WORK_DIR}/fixture.md-L13.c ${WORK_DIR}/fixture.md-L24.cpp)
if(NOT got STREQUAL want)
  message(FATAL_ERROR "extracted ${got}\nwanted    ${want}")
endif()

function(expect file content)
  file(READ ${file} actual)
  if(NOT actual STREQUAL content)
    message(FATAL_ERROR "${file}:\n---- got ----\n${actual}\n---- wanted ----\n${content}")
  endif()
endfunction()
expect(${WORK_DIR}/fixture.md-L3.cpp "#line 4 \"${md}\"\nint First() { return 1; }\n")
expect(${WORK_DIR}/fixture.md-L13.c
  "#line 14 \"${md}\"\n\n/* a C block; the empty lines around it belong to it */\nint second(void) { return 2; }\n\n")
expect(${WORK_DIR}/fixture.md-L24.cpp
  "#line 25 \"${md}\"\n// semicolons; \"strings with ``` inside\"; and a ```cpp that is not a fence\nint Third() { int a = 1; return a; }\n")

# An indented cpp fence is an error, not a block silently left out.
file(WRITE ${WORK_DIR}/indented.md "text\n  ```cpp\nint x;\n  ```\n")
execute_process(COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${SOURCE_DIR} -DMD=${WORK_DIR}/indented.md
                        -DOUT=${WORK_DIR} -P ${SOURCE_DIR}/tests/docs/extract_one.cmake
                RESULT_VARIABLE rc ERROR_VARIABLE err)
# CMake wraps long messages at spaces, where depends on the path's length: match the flattened text.
string(REGEX REPLACE "[ \t\r\n]+" " " flat "${err}")
if(rc EQUAL 0 OR NOT flat MATCHES "indented.md:2: an indented")
  message(FATAL_ERROR "indented fence: rc=${rc}, error output: ${err}")
endif()
message(STATUS "docs.snippet_extraction: 3 blocks extracted as expected; indented fence rejected")
