# Tests of the dma layer (hmmkit::dma). Included from tests/CMakeLists.txt.
hmmkit_test(dma_test SOURCES unit/dma_test.cpp LIBS hmmkit::dma)

# The suites are named CpuDma, Fence, LinkModel, ...: register them in ctest as "dma.<Suite>.<Test>"
# so that `ctest -R dma` selects this layer. hmmkit_test has no prefix option, so discover once more
# with a prefix and drop the unprefixed list it registered. (Replace with a PREFIX argument to
# hmmkit_test when it gets one.)
get_property(_dma_includes DIRECTORY PROPERTY TEST_INCLUDE_FILES)
list(FILTER _dma_includes EXCLUDE REGEX "/dma_test\\[[0-9]+\\]_include\\.cmake$")
set_property(DIRECTORY PROPERTY TEST_INCLUDE_FILES ${_dma_includes})
gtest_discover_tests(dma_test TEST_PREFIX "dma." DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 120)

# VulkanDmaEngine on the machine's Vulkan device (lavapipe in CI: scripts/install-deps.sh installs
# mesa-vulkan-drivers). Its suites (VulkanDma*) are registered as "dma.<Suite>.<Test>" too. Without
# a usable device the tests skip, naming Create's error; HMMKIT_REQUIRE_VULKAN=1 makes that fail.
hmmkit_test(vulkan_engine_test SOURCES unit/vulkan_engine_test.cpp LIBS hmmkit::dma)
get_property(_dma_includes DIRECTORY PROPERTY TEST_INCLUDE_FILES)
list(FILTER _dma_includes EXCLUDE REGEX "/vulkan_engine_test\\[[0-9]+\\]_include\\.cmake$")
set_property(DIRECTORY PROPERTY TEST_INCLUDE_FILES ${_dma_includes})
gtest_discover_tests(vulkan_engine_test TEST_PREFIX "dma." DISCOVERY_TIMEOUT 60
  PROPERTIES TIMEOUT 120)
