# HMMKIT_FUZZ=ON builds the libFuzzer harnesses of tests/fuzz (Clang only, with HMMKIT_SANITIZE
# = address; the "fuzz" preset). Every target gets coverage instrumentation (fuzzer-no-link); the
# harness executables link the libFuzzer driver with hmmkit_fuzz_harness_link(). Without it the
# harnesses are built with tests/fuzz/replay_main.cpp and only replay the checked-in corpus.
option(HMMKIT_FUZZ "Build the libFuzzer harnesses (Clang, with HMMKIT_SANITIZE=address)" OFF)

if(HMMKIT_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "HMMKIT_FUZZ needs Clang (libFuzzer), not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  if(NOT HMMKIT_SANITIZE STREQUAL "address")
    # The sanitizer runtime also supplies the coverage callbacks of non-harness executables.
    message(FATAL_ERROR "HMMKIT_FUZZ needs HMMKIT_SANITIZE=address")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()

function(hmmkit_fuzz_harness_link target)
  if(HMMKIT_FUZZ)
    target_link_options(${target} PRIVATE -fsanitize=fuzzer)
  endif()
endfunction()
