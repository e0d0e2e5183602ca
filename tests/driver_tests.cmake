# driver/ test suites (included from tests/CMakeLists.txt).
hmmkit_test(device_memory_test SOURCES unit/device_memory_test.cpp LIBS hmmkit::driver)
hmmkit_test(svm_manager_test SOURCES unit/svm_manager_test.cpp LIBS hmmkit::driver hmmkit::dma)
hmmkit_test(svm_attributes_test SOURCES unit/svm_attributes_test.cpp LIBS hmmkit::driver)
