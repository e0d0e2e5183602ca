// Misuse of DMA fences (hmmkit/dma/fence.hpp): a fence waited twice, by many threads, after its
// engine is gone, and an engine that signals a fence more often than it promised (a bug that must
// abort loudly instead of corrupting the results).
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/dma/cpu_engine.hpp"
#include "hmmkit/dma/fence.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using dma::Fence;
using dma::FenceSignal;

TEST(DmaFenceBadInputTest, WaitedTwiceAndByManyThreadsTheResultNeverChanges) {
  // Given a batch of two descriptors, the second of which fails
  FenceSignal signal(2, 2);
  Fence f = signal.fence();
  EXPECT_FALSE(f.Poll());
  std::vector<std::thread> waiters;
  std::atomic<int> saw_eio{0};
  for (int t = 0; t < 8; ++t)
    waiters.emplace_back([&] {
      if (f.Wait().errno_value() == EIO) saw_eio++;
    });
  // When the engine finishes it
  signal.Finish(1, Status::FromErrno(EIO, "bad descriptor"));
  signal.Finish(0, Status::Ok());
  for (auto& t : waiters) t.join();
  // Then every waiter, every later Wait and WaitFor see the same result
  EXPECT_EQ(saw_eio.load(), 8);
  for (int i = 0; i < 2; ++i) {
    EXPECT_TRUE(f.Poll());
    EXPECT_TRUE(f.WaitFor(std::chrono::nanoseconds(0)));
    EXPECT_EQ(f.Wait().errno_value(), EIO);
    ASSERT_EQ(f.results().size(), 2u);
    EXPECT_TRUE(f.results()[0].ok());
    EXPECT_EQ(f.results()[1].errno_value(), EIO);
  }
  // And a copy made after completion answers the same
  Fence copy = f;
  EXPECT_EQ(copy.Wait().errno_value(), EIO);
}

TEST(DmaFenceBadInputTest, FencesOutliveTheirEngineWithTheirResults) {
  // Given an engine that copies one good page and faults on an unmapped source
  auto engine = dma::CpuDmaEngine::Create({});
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  Mapping src(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  Mapping dst(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  std::memset(src.data(), 0x3c, src.size());
  std::memset(dst.data(), 0, dst.size());
  void* hole = UnmappedAddress();
  ASSERT_NE(hole, nullptr);
  const std::vector<dma::Descriptor> batch = {
      dma::Descriptor::Copy({dst.data(), dma::Memory::kSystem}, {src.data(), dma::Memory::kSystem},
                            PageSize()),
      dma::Descriptor::Copy({dst.page(1), dma::Memory::kSystem}, {hole, dma::Memory::kSystem},
                            PageSize()),
  };
  auto fence = (*engine)->Submit(batch);
  ASSERT_TRUE(fence.ok()) << fence.status().ToString();
  Fence f = *fence;
  // When the engine is destroyed before anyone waits
  engine->reset();
  // Then the fence is complete, with the good copy done and EFAULT for the bad one, every time
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(f.Poll());
    EXPECT_EQ(f.Wait().errno_value(), EFAULT);
    EXPECT_TRUE(f.results()[0].ok());
  }
  for (size_t i = 0; i < PageSize(); ++i) ASSERT_EQ(dst.data()[i], 0x3c) << i;
  // And the faulting descriptor wrote nothing
  for (size_t i = 0; i < PageSize(); ++i) ASSERT_EQ(dst.page(1)[i], 0) << i;
}

TEST(DmaFenceBadInputDeathTest, FinishingMoreUnitsThanPromisedAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // Given a fence of one descriptor and one unit, already complete
  FenceSignal signal(1, 1);
  signal.Finish(0, Status::Ok());
  // When an engine reports the unit again, or a descriptor out of range, then the process aborts
  EXPECT_DEATH(signal.Finish(0, Status::Ok()), "");
  FenceSignal other(1, 2);
  EXPECT_DEATH(other.Finish(1, Status::Ok()), "");
  // And the completed fence kept its result
  EXPECT_TRUE(signal.fence().Wait().ok());
}

}  // namespace
}  // namespace hmmkit::test
