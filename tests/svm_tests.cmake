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
add_test(NAME sample.vector_add COMMAND vector_add 262144)
add_test(NAME sample.linked_list COMMAND linked_list 16 500)
add_test(NAME sample.tree_walk COMMAND tree_walk 4000 4000)
add_test(NAME sample.stencil COMMAND stencil 65536 4)
add_test(NAME sample.oversubscribe COMMAND oversubscribe 8 3)
set_tests_properties(sample.vector_add sample.linked_list sample.tree_walk sample.stencil
  sample.oversubscribe PROPERTIES TIMEOUT 180)
