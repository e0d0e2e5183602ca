// The registry of hmmkit's own memory: ranges, holes, thread scopes, and that a migration leaves
// registered pages (and the migrating thread's own stack) in system memory.
#include "hmmkit/base/internal_memory.hpp"

#include <pthread.h>
#include <sys/mman.h>

#include <chrono>
#include <thread>

#include <gtest/gtest.h>

#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "test_pagemap.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

TEST(InternalMemoryTest, OutsideCutsRegisteredRangesAndTheExtraOne) {
  const uintptr_t base = uintptr_t(1) << 44;  // far from any real mapping
  ASSERT_TRUE(InternalMemory::Add(base + 0x2000, base + 0x3000));
  EXPECT_TRUE(InternalMemory::Overlaps(base + 0x2fff, base + 0x4000));
  EXPECT_FALSE(InternalMemory::Overlaps(base + 0x3000, base + 0x4000));
  auto pieces = InternalMemory::Outside(base, base + 0x8000, {base + 0x5000, base + 0x6000});
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_EQ(pieces[0], std::make_pair(base, base + 0x2000));
  EXPECT_EQ(pieces[1], std::make_pair(base + 0x3000, base + 0x5000));
  EXPECT_EQ(pieces[2], std::make_pair(base + 0x6000, base + 0x8000));
  InternalMemory::Remove(base + 0x2000, base + 0x3000);
  EXPECT_FALSE(InternalMemory::Overlaps(base, base + 0x8000));
}

TEST(InternalMemoryTest, MapInternalAndThreadScopesRegisterUntilReleased) {
  void* p = MapInternal(3 * PageSize());
  ASSERT_NE(p, nullptr);
  const auto s = reinterpret_cast<uintptr_t>(p);
  EXPECT_TRUE(InternalMemory::Overlaps(s, s + 1));
  UnmapInternal(p, 3 * PageSize());
  EXPECT_FALSE(InternalMemory::Overlaps(s, s + 3 * PageSize()));

  std::pair<uintptr_t, uintptr_t> stack{}, tcb{};
  bool inside = false;
  char name[16] = {};
  std::thread t([&] {
    InternalThreadScope scope("hmmkit-test");
    pthread_getname_np(pthread_self(), name, sizeof name);
    stack = CurrentThreadStack();
    tcb = CurrentThreadControlBlock(/*with_tls=*/true);
    int local = 0;
    const auto here = reinterpret_cast<uintptr_t>(&local);
    inside = stack.first <= here && here < stack.second;
    EXPECT_TRUE(InternalMemory::Overlaps(here, here + 1));
    const auto self = reinterpret_cast<uintptr_t>(pthread_self());
    EXPECT_TRUE(InternalMemory::Overlaps(self, self + 1)) << "the thread control block";
  });
  t.join();
  EXPECT_TRUE(inside) << "CurrentThreadStack covers the thread's locals";
  EXPECT_STREQ(name, "hmmkit-test") << "the scope names the thread for ps, /proc and debuggers";
  EXPECT_FALSE(InternalMemory::Overlaps(stack.first, stack.second)) << "unregistered at exit";
  EXPECT_FALSE(InternalMemory::Overlaps(tcb.first, tcb.second));
}

// errno sits in static TLS below the thread pointer, and libc writes it inside calls a migrating
// thread makes (free() after an munmap): its page must be in the control-block pages that a
// migration never takes, on the main thread and on others.
TEST(InternalMemoryTest, ControlBlockPagesCoverErrno) {
  auto covers_errno = [] {
    const auto [s, e] = CurrentThreadControlBlock(/*with_tls=*/false);
    const auto at = reinterpret_cast<uintptr_t>(&errno);
    return s <= at && at < e;
  };
  EXPECT_TRUE(covers_errno()) << "main thread";
  bool other = false;
  std::thread([&] { other = covers_errno(); }).join();
  EXPECT_TRUE(other) << "a created thread";
}

TEST(InternalMemoryTest, MigrationLeavesRegisteredPagesInSystemMemory) {
  auto as = MakeAddressSpace({});
  ASSERT_TRUE(as);
  if (!as->monitor()) GTEST_SKIP() << "no userfaultfd monitor";
  const size_t n = 8, pg = PageSize();
  Mapping m(n * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  for (size_t i = 0; i < n; ++i) m.data()[i * pg] = char(i + 1);
  // Pages 2 and 3 are someone's internal memory
  ASSERT_TRUE(InternalMemory::Add(m.addr() + 2 * pg, m.addr() + 4 * pg));
  int owner = 0;
  TestPagemap pm(64, PageKind::kDevicePrivate, &owner, as.get());
  size_t cpages = 0;
  ASSERT_TRUE(MigrateToDevice(*as, pm, m.addr(), m.end(), &cpages).ok());
  EXPECT_EQ(cpages, n - 2);
  EXPECT_EQ(as->device_page_count(), n - 2);
  // The registered pages never left: touching them needs no fault-back
  const uint64_t faults = as->monitor()->stats().faults;
  EXPECT_EQ(m.data()[2 * pg], 3);
  EXPECT_EQ(m.data()[3 * pg], 4);
  EXPECT_EQ(as->monitor()->stats().faults, faults);
  InternalMemory::Remove(m.addr() + 2 * pg, m.addr() + 4 * pg);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(m.data()[i * pg], char(i + 1)) << i;
  ASSERT_TRUE(MigrateAllToRam(*as, pm).ok());
  // The fault thread drops its pagemap references after the kernel woke the touching thread:
  // wait until every page is back (in_use() takes the pagemap's lock, which orders us after the
  // fault thread's last PutPage) before the pagemap goes away.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (pm.in_use() != 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_EQ(pm.in_use(), 0u);
}

}  // namespace
}  // namespace hmmkit::test
