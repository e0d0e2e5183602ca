# libFuzzer harnesses (tests/fuzz/README.md; included from tests/CMakeLists.txt, area "fuzz").
# With HMMKIT_FUZZ (the "fuzz" preset) each harness is a libFuzzer binary; in every other build it
# is linked with replay_main.cpp. Either way ctest fuzz.<harness>.replay runs the checked-in corpus
# and the regression inputs once.
function(hmmkit_fuzz_harness name)
  cmake_parse_arguments(F "" "" "SOURCES;LIBS" ${ARGN})
  set(target fuzz_${name})
  if(HMMKIT_FUZZ)
    add_executable(${target} ${F_SOURCES})
  else()
    add_executable(${target} ${F_SOURCES} fuzz/replay_main.cpp)
  endif()
  target_include_directories(${target} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/fuzz)
  target_link_libraries(${target} PRIVATE ${F_LIBS})
  hmmkit_warnings(${target})
  hmmkit_fuzz_harness_link(${target})
  set(corpus ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/corpus/${name})
  set(regressions ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/regressions/${name})
  if(HMMKIT_FUZZ)
    # -runs=0: execute the given corpus once, fuzz nothing, write nothing.
    add_test(NAME fuzz.${name}.replay COMMAND ${target} -runs=0 -rss_limit_mb=4096 ${corpus} ${regressions})
  else()
    add_test(NAME fuzz.${name}.replay COMMAND ${target} ${corpus} ${regressions})
  endif()
  set_tests_properties(fuzz.${name}.replay PROPERTIES TIMEOUT 300)
endfunction()

hmmkit_fuzz_harness(dmirror SOURCES fuzz/fuzz_dmirror.cpp fuzz/dmirror_arena.cpp LIBS hmmkit::dmirror)
hmmkit_fuzz_harness(svm SOURCES fuzz/fuzz_svm.cpp LIBS hmmkit::svm)
