# userlib's SVM API and the samples (included from tests/CMakeLists.txt, area "svm").
hmmkit_test(svm_api_test SOURCES unit/svm_api_test.cpp LIBS hmmkit::svm)
hmmkit_test(fault_injection_test SOURCES unit/fault_injection_test.cpp LIBS hmmkit::svm)

# The C interface, exercised from C.
add_executable(svm_c_test unit/svm_c_test.c)
set_target_properties(svm_c_test PROPERTIES C_STANDARD 11 C_STANDARD_REQUIRED ON LINKER_LANGUAGE CXX)
target_link_libraries(svm_c_test PRIVATE hmmkit::svm)
target_compile_options(svm_c_test PRIVATE -Wall -Wextra -Wshadow)
if(HMMKIT_WERROR)
  target_compile_options(svm_c_test PRIVATE -Werror)
endif()
add_test(NAME svm.c_api COMMAND svm_c_test)
set_tests_properties(svm.c_api PROPERTIES TIMEOUT 120)

# Each sample checks its own result and exits non-zero when it is wrong (small sizes for CI).
# hang-report.sh gives up before ctest's timeout and prints every thread's wait channel and
# backtrace, so a rare hang in CI can be diagnosed from the log.
set(_hang_report bash ${CMAKE_CURRENT_SOURCE_DIR}/support/hang-report.sh 150)
add_test(NAME sample.vector_add COMMAND ${_hang_report} $<TARGET_FILE:vector_add> 262144)
add_test(NAME sample.linked_list COMMAND ${_hang_report} $<TARGET_FILE:linked_list> 16 500)
add_test(NAME sample.tree_walk COMMAND ${_hang_report} $<TARGET_FILE:tree_walk> 4000 4000)
add_test(NAME sample.stencil COMMAND ${_hang_report} $<TARGET_FILE:stencil> 65536 4)
add_test(NAME sample.oversubscribe COMMAND ${_hang_report} $<TARGET_FILE:oversubscribe> 8 3)
set_tests_properties(sample.vector_add sample.linked_list sample.tree_walk sample.stencil
  sample.oversubscribe PROPERTIES TIMEOUT 180)
# The wrapper itself: a program that does not return is reported, with its threads, then killed.
add_test(NAME sample.hang_report_detects COMMAND bash
  ${CMAKE_CURRENT_SOURCE_DIR}/support/hang-report.sh 1 sleep 60)
set_tests_properties(sample.hang_report_detects PROPERTIES TIMEOUT 90
  PASS_REGULAR_EXPRESSION "sleep still running after 1 s: a hang.*threads \\(/proc/[0-9]+/task.* sleep .*(backtraces \\(gdb|no gdb on PATH)")
