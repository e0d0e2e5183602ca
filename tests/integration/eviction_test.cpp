// Device memory smaller than the working set: migrations evict the coldest chunk back to system
// memory by device page (migrate_device_range), and no byte is lost over repeated cycles.
// Runs with HMMKIT_DMIRROR_DEVICE_MB=4 (two 2 MiB chunks per device; see
// tests/migrate_tests.cmake).
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/dmirror.h"

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kBufferPages = 512;  // 2 MiB each: three of them do not fit on the device
constexpr int kBuffers = 3;
constexpr int kCycles = 6;

uint32_t Pattern(int buffer, size_t word, int cycle) {
  return uint32_t(buffer) * 0x01000193u ^ uint32_t(word) * 2654435761u ^ uint32_t(cycle);
}

class EvictionTest : public ::testing::TestWithParam<unsigned> {};

TEST_P(EvictionTest, EveryByteSurvivesRepeatedMigrateEvictCycles) {
  int h = hmm_dmirror_open(GetParam());
  if (h < 0 && errno == ENOTSUP) GTEST_SKIP() << "no userfaultfd";
  ASSERT_GE(h, 0) << strerror(errno);
  const size_t len = kBufferPages * kPage;
  std::vector<uint32_t*> bufs;
  for (int b = 0; b < kBuffers; ++b) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(p, MAP_FAILED);
    bufs.push_back(static_cast<uint32_t*>(p));
  }
  std::vector<char> bounce(len);
  for (int cycle = 0; cycle < kCycles; ++cycle) {
    for (int b = 0; b < kBuffers; ++b) {
      // Given new data written by the CPU
      for (size_t w = 0; w < len / 4; ++w) bufs[b][w] = Pattern(b, w, cycle);
      // When the buffer migrates to a device that has room for two of three buffers
      hmm_dmirror_cmd c{};
      c.addr = uintptr_t(bufs[b]);
      c.ptr = uintptr_t(bounce.data());
      c.npages = kBufferPages;
      ASSERT_EQ(hmm_dmirror_ioctl(h, HMM_DMIRROR_MIGRATE_TO_DEV, &c), 0)
          << "cycle " << cycle << " buffer " << b << ": " << strerror(errno);
      EXPECT_EQ(c.cpages, kBufferPages);
      EXPECT_EQ(std::memcmp(bounce.data(), bufs[b], len), 0) << "the device read back its data";
    }
    // Then every buffer, on the device or evicted, still holds its bytes
    for (int b = 0; b < kBuffers; ++b) {
      size_t wrong = 0;
      for (size_t w = 0; w < len / 4; ++w) wrong += bufs[b][w] != Pattern(b, w, cycle);
      ASSERT_EQ(wrong, 0u) << "cycle " << cycle << " buffer " << b;
    }
  }
  for (uint32_t* p : bufs) munmap(p, len);
  hmm_dmirror_close(h);
}

INSTANTIATE_TEST_SUITE_P(Devices, EvictionTest, ::testing::Values(0u, 2u),
                         [](const auto& p) { return p.param == 0 ? "Private" : "Coherent"; });

}  // namespace
