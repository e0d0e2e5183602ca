// driver::MigrateToDevice / MigrateToSystem with a DeviceMemory and the CPU DMA engine: the copies
// go as one descriptor per run of pages contiguous on both sides, and private pages come back
// from host-visible device memory without staging, counted by the device memory.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>

#include "hmmkit/dma/cpu_engine.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/driver/device_migration.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

constexpr size_t kChunk = size_t(2) << 20;

class DeviceMigrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    as_ = MakeAddressSpace();
    if (!as_->monitor()) GTEST_SKIP() << "no userfaultfd monitor";
    driver::DeviceMemory::Options o;
    o.capacity = 2 * kChunk;
    o.owner = this;
    o.name = "device-migration-test";
    auto mem = driver::DeviceMemory::Create(o);
    ASSERT_TRUE(mem.ok()) << mem.status().ToString();
    mem_ = *mem;
    auto dma = dma::CpuDmaEngine::Create({});
    ASSERT_TRUE(dma.ok());
    dma_ = std::move(*dma);
  }
  void TearDown() override {
    if (mem_) {
      ASSERT_TRUE(MigrateAllToRam(*as_, *mem_).ok());
    }
  }

  std::shared_ptr<AddressSpace> as_;
  std::shared_ptr<driver::DeviceMemory> mem_;
  std::unique_ptr<dma::CpuDmaEngine> dma_;
};

// A 2 MiB-aligned buffer of two chunks, one VMA, filled with a pattern.
struct Buffer {
  Buffer() {
    raw = static_cast<char*>(
        mmap(nullptr, 3 * kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    data = reinterpret_cast<char*>((uintptr_t(raw) + kChunk - 1) & ~(kChunk - 1));
    for (size_t i = 0; i < 2 * kChunk; i += 8) std::memcpy(data + i, &i, 8);
  }
  ~Buffer() { munmap(raw, 3 * kChunk); }
  bool Intact() const {
    for (size_t i = 0; i < 2 * kChunk; i += 8)
      if (std::memcmp(data + i, &i, 8) != 0) return false;
    return true;
  }
  uintptr_t start() const { return uintptr_t(data); }
  uintptr_t end() const { return start() + 2 * kChunk; }
  char* raw;
  char* data;
};

TEST_F(DeviceMigrationTest, ChunksMoveAsOneDescriptorEach) {
  Buffer b;
  // When two whole aligned chunks migrate to the device
  auto r = driver::MigrateToDevice(*as_, *mem_, *dma_, b.start(), b.end());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->migrated, 2 * kChunk / PageSize());
  // Then each chunk was at most one descriptor (not 512; adjacent chunks may share one)
  const uint64_t to_device = dma_->stats().descriptors;
  EXPECT_GE(to_device, 1u);
  EXPECT_LE(to_device, 2u);
  // And back to system memory by the driver: again one descriptor per chunk
  auto back = driver::MigrateToSystem(*as_, *mem_, *dma_, b.start(), b.end());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->migrated, 2 * kChunk / PageSize());
  EXPECT_LE(dma_->stats().descriptors - to_device, 2u);
  EXPECT_TRUE(b.Intact());
  EXPECT_EQ(as_->device_page_count(), 0u);
}

TEST_F(DeviceMigrationTest, CpuFaultsCopyStraightFromHostVisibleDeviceMemory) {
  Buffer b;
  auto r = driver::MigrateToDevice(*as_, *mem_, *dma_, b.start(), b.end());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const uint64_t descriptors = dma_->stats().descriptors;
  // When the CPU reads everything back through faults
  EXPECT_TRUE(b.Intact());
  // Then every page came back, counted as copied to RAM, without the DMA engine
  EXPECT_EQ(as_->device_page_count(), 0u);
  EXPECT_EQ(mem_->stats().pages_copied_to_ram, 2 * kChunk / PageSize());
  EXPECT_EQ(dma_->stats().descriptors, descriptors);
  EXPECT_EQ(mem_->stats().pages_in_use, 0u);
}

}  // namespace
}  // namespace hmmkit::test
