# Reliability: bad input across the public APIs, resource limits, and the device's memory-safety
# guarantees (docs/reliability.md). Included from tests/CMakeLists.txt (area "reliability").
if(NOT TARGET hmmkit::dmirror OR NOT TARGET hmmkit::svm)
  message(WARNING "hmmkit::dmirror or hmmkit::svm is not defined: reliability_test is not built")
  return()
endif()

# Links libhmmkit_interpose: one security test turns interposition on (HMMKIT_INTERPOSE=1) to see
# mprotect; everywhere else it is loaded but off.
hmmkit_test(reliability_test
  SOURCES
    reliability/bad_input_mirror_test.cpp
    reliability/bad_input_svm_test.cpp
    reliability/bad_input_dmirror_test.cpp
    reliability/bad_input_fence_test.cpp
    reliability/limits_test.cpp
    reliability/security_test.cpp
  LIBS hmmkit::svm hmmkit::dmirror hmmkit::dma hmmkit::interpose Threads::Threads)
