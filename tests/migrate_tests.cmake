hmmkit_test(migrate_test SOURCES unit/migrate_test.cpp)

# Device memory smaller than the working set (4 MiB per device).
add_executable(eviction_test integration/eviction_test.cpp)
target_link_libraries(eviction_test PRIVATE hmmkit::dmirror GTest::gtest GTest::gtest_main)
hmmkit_warnings(eviction_test)
gtest_discover_tests(eviction_test DISCOVERY_TIMEOUT 60
  PROPERTIES TIMEOUT 300 ENVIRONMENT "HMMKIT_DMIRROR_DEVICE_MB=4")
hmmkit_test(internal_memory_test SOURCES unit/internal_memory_test.cpp)
