# Tracing (hmmkit/base/trace.hpp) and the stats files (included from tests/CMakeLists.txt, area
# "trace").
hmmkit_test(trace_test SOURCES unit/trace_test.cpp unit/trace_checker.cpp)
if(TARGET hmmkit::svm)
  hmmkit_test(trace_svm_test SOURCES unit/trace_svm_test.cpp unit/trace_checker.cpp LIBS hmmkit::svm)
  # The publisher's private header (svm/stats_publisher.hpp) is tested directly.
  target_include_directories(trace_svm_test PRIVATE ${PROJECT_SOURCE_DIR}/userlib/svm)
endif()
