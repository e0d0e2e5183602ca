# Every ```cpp and ```c block of the documentation is a translation unit that the build compiles.
#
# Extraction runs in CMake at configure time (no python on the CI machine); each Markdown file is a
# configure dependency, so editing a doc re-extracts its blocks on the next build. A block becomes
# <out>/<doc>.md-L<line>.<cpp|c>, where <line> is the line of its opening fence, and starts with a
# #line directive, so a compiler error names the Markdown file and the line inside the block.
# A block that is not meant to compile is tagged ```text (or sh, ...), never cpp or c.
#
# Usable in script mode too (cmake -P): hmmkit_extract_snippets has no target side effects.

# hmmkit_extract_snippets(MD OUTDIR OUT_VAR): writes MD's cpp/c blocks into OUTDIR (unchanged files
# are not rewritten, so the build does not recompile them) and appends their paths to OUT_VAR.
function(hmmkit_extract_snippets md outdir out_var)
  file(READ "${md}" text)
  string(APPEND text "\n")  # a closing fence on the last line needs its newline too
  get_filename_component(doc "${md}" NAME)
  set(found "")
  set(pos 0)
  set(line 1)  # line number of character `pos`
  string(LENGTH "${text}" len)
  while(pos LESS len)
    string(SUBSTRING "${text}" ${pos} -1 rest)
    string(FIND "${rest}" "\n" nl)
    if(nl EQUAL -1)
      set(current "${rest}")
      set(next ${len})
    else()
      string(SUBSTRING "${rest}" 0 ${nl} current)
      math(EXPR next "${pos} + ${nl} + 1")
    endif()
    if(current MATCHES "^[ \t]+```(cpp|c)[ \t]*$")
      message(FATAL_ERROR "${md}:${line}: an indented ```${CMAKE_MATCH_1} block is not compiled; "
                          "start the fence in column 1 (or tag the block text)")
    endif()
    if(current MATCHES "^```(cpp|c)[ \t]*$")
      set(lang "${CMAKE_MATCH_1}")
      set(open_line ${line})
      # Find the closing fence: a line that is exactly ```.
      string(SUBSTRING "${text}" ${next} -1 body_and_rest)
      string(FIND "${body_and_rest}" "\n```\n" close)
      if(body_and_rest MATCHES "^```\n")
        set(close -1)
        set(body "")
        set(body_len 0)
      elseif(close EQUAL -1)
        message(FATAL_ERROR "${md}:${open_line}: ```${lang} block has no closing fence")
      else()
        math(EXPR body_len "${close} + 1")
        string(SUBSTRING "${body_and_rest}" 0 ${body_len} body)
      endif()
      if(lang STREQUAL "cpp")
        set(ext cpp)
      else()
        set(ext c)
      endif()
      math(EXPR first_body_line "${open_line} + 1")
      set(src "${outdir}/${doc}-L${open_line}.${ext}")
      file(WRITE "${src}.tmp" "#line ${first_body_line} \"${md}\"\n${body}")
      file(COPY_FILE "${src}.tmp" "${src}" ONLY_IF_DIFFERENT)
      file(REMOVE "${src}.tmp")
      list(APPEND found "${src}")
      # Continue after the closing fence, counting the lines skipped.
      string(REGEX MATCHALL "\n" nls "${body}")
      list(LENGTH nls body_lines)
      math(EXPR line "${line} + 1 + ${body_lines} + 1")
      math(EXPR pos "${next} + ${body_len} + 4")
      continue()
    endif()
    math(EXPR line "${line} + 1")
    set(pos ${next})
  endwhile()
  set(${out_var} ${${out_var}} ${found} PARENT_SCOPE)
endfunction()

# hmmkit_doc_snippets(TARGET OUTDIR DOCS... LIBS ...): extracts every block of DOCS into OUTDIR and
# compiles them in the object libraries TARGET (C++) and TARGET_c (C), part of `all`, with hmmkit's
# warnings (errors under HMMKIT_WERROR) and the public headers of LIBS.
function(hmmkit_doc_snippets target)
  cmake_parse_arguments(S "" "OUTDIR" "DOCS;LIBS" ${ARGN})
  file(MAKE_DIRECTORY "${S_OUTDIR}")
  set(sources "")
  foreach(md ${S_DOCS})
    set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${md}")
    hmmkit_extract_snippets("${md}" "${S_OUTDIR}" sources)
  endforeach()
  # Blocks that left the docs must leave the build too.
  file(GLOB old "${S_OUTDIR}/*.cpp" "${S_OUTDIR}/*.c")
  foreach(f ${old})
    if(NOT f IN_LIST sources)
      file(REMOVE "${f}")
    endif()
  endforeach()
  list(LENGTH sources count)
  message(STATUS "hmmkit: ${count} documentation snippets compiled by ${target}")
  if(count EQUAL 0)
    return()
  endif()
  set(cxx_sources ${sources})
  list(FILTER cxx_sources INCLUDE REGEX "\\.cpp$")
  set(c_sources ${sources})
  list(FILTER c_sources INCLUDE REGEX "\\.c$")
  if(cxx_sources)
    add_library(${target} OBJECT ${cxx_sources})
    target_link_libraries(${target} PRIVATE ${S_LIBS})
    # Snippets are examples: a function nobody calls is normal in them.
    target_compile_options(${target} PRIVATE -Wno-unused-function)
    hmmkit_warnings(${target})
  endif()
  if(c_sources)
    # hmmkit_warnings carries C++-only flags (-Wnon-virtual-dtor, ...): C blocks get the C subset.
    add_library(${target}_c OBJECT ${c_sources})
    target_link_libraries(${target}_c PRIVATE ${S_LIBS})
    target_compile_options(${target}_c PRIVATE -Wall -Wextra -Wshadow -Wcast-align
      -Wimplicit-fallthrough -Wstrict-prototypes -Wno-unused-function $<$<BOOL:${HMMKIT_WERROR}>:-Werror>)
  endif()
endfunction()
