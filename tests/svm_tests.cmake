# userlib's SVM API and the samples (included from tests/CMakeLists.txt, area "svm").
hmmkit_test(svm_api_test SOURCES unit/svm_api_test.cpp LIBS hmmkit::svm)
# Each sample checks its own result and exits non-zero when it is wrong.
add_test(NAME sample.vector_add COMMAND vector_add 262144)
set_tests_properties(sample.vector_add PROPERTIES TIMEOUT 120)
