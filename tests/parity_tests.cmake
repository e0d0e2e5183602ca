# The test_hmm parity suite (tests/parity/) and the plain C client that runs under the dmirror
# LD_PRELOAD shim. Included from tests/CMakeLists.txt (area "parity").
if(NOT TARGET hmmkit::dmirror)
  message(WARNING "hmmkit::dmirror (userlib/dmirror) is not defined: the parity tests are not built")
  return()
endif()

# hmmkit_test() without its registration: every parity test is registered as "parity.<suite>.<test>"
# so that `ctest -R parity` selects the whole area.
add_executable(parity_test
  parity/parity_test.cpp
  parity/parity_basic_test.cpp
  parity/parity_migrate_test.cpp
  parity/parity_fork_test.cpp
  parity/parity_exclusive_test.cpp)
target_link_libraries(parity_test PRIVATE hmmkit_test_support hmmkit::dmirror Threads::Threads
  GTest::gtest GTest::gtest_main)
hmmkit_warnings(parity_test)
gtest_discover_tests(parity_test TEST_PREFIX "parity." DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 120)

# An unmodified test_hmm-style client: it does not link hmmkit, only includes the header for the
# command struct and request numbers, and reaches hmmkit through the shim.
add_executable(dmirror_client parity/dmirror_client.c)
set_target_properties(dmirror_client PROPERTIES C_STANDARD 11 C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)
target_include_directories(dmirror_client PRIVATE ${PROJECT_SOURCE_DIR}/userlib/include)
target_compile_options(dmirror_client PRIVATE -Wall -Wextra -Wshadow)
if(HMMKIT_WERROR)
  target_compile_options(dmirror_client PRIVATE -Werror)
endif()
if(HMMKIT_SANITIZE)
  # The preloaded C++ library calls into the C++ parts of the sanitizer runtimes (UBSan's vptr
  # checks), which the C driver does not link into a C executable.
  set_target_properties(dmirror_client PROPERTIES LINKER_LANGUAGE CXX)
endif()

if(TARGET hmmkit_dmirror_shim)
  # Under ASan the preloaded shim loads ahead of the executable's ASan runtime.
  set(_parity_asan_env "")
  if(HMMKIT_SANITIZE STREQUAL "address")
    set(_parity_asan_env "ASAN_OPTIONS=verify_asan_link_order=0")
  endif()
  add_test(NAME parity.c_client_under_shim
    COMMAND ${CMAKE_COMMAND} -E env ${_parity_asan_env}
      LD_PRELOAD=$<TARGET_FILE:hmmkit_dmirror_shim> $<TARGET_FILE:dmirror_client>)
  set_tests_properties(parity.c_client_under_shim PROPERTIES TIMEOUT 60)
  # Without the shim the client must fail and say why.
  add_test(NAME parity.c_client_without_shim COMMAND dmirror_client)
  set_tests_properties(parity.c_client_without_shim PROPERTIES TIMEOUT 60
    PASS_REGULAR_EXPRESSION "no /dev/hmm_dmirror0: run under the hmmkit shim")
else()
  message(WARNING "hmmkit_dmirror_shim is not defined: parity.c_client_under_shim is not registered")
endif()
