// Tlb and DeviceMmu (driver/emu/include/hmmkit/emu/{tlb,mmu}.hpp): TLB hits, LRU and shootdown;
// translation errors; and the MMU's contract that a mapping change returns only once no compute
// unit can still use a translation from before it.
//
// The tests never sleep to order threads. Where a test must know that a mapping change is waiting
// for a compute unit, it asks the unit's own guard (ShouldYield), which turns true once the change
// announced itself.
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/emu/mmu.hpp"
#include "hmmkit/emu/tlb.hpp"

namespace hmmkit::emu {
namespace {

constexpr uint64_t kPage = kPageSize;
constexpr uint64_t k2M = LevelSpan(1);

Pte SystemPte(uint64_t target, Perm perms = Perm::kRead | Perm::kWrite) {
  return Pte{.target = target, .target_kind = Target::kSystem, .perms = perms};
}

Translation Leaf(uint64_t va, uint64_t size, uint64_t target) {
  return Translation{SystemPte(target), va, size};
}

// ---- Tlb --------------------------------------------------------------------------------------

TEST(Tlb, MissesWhenEmptyAndHitsAfterInsert) {
  Tlb tlb(4);
  EXPECT_FALSE(tlb.Lookup(0x5000).has_value());
  tlb.Insert(Leaf(0x5000, kPage, 0x9000));
  std::optional<Translation> t = tlb.Lookup(0x5fff);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->CpuAddress(0x5fff), 0x9fffu);
  EXPECT_FALSE(tlb.Lookup(0x6000).has_value());
  EXPECT_EQ(tlb.stats().hits, 1u);
  EXPECT_EQ(tlb.stats().misses, 2u);
}

TEST(Tlb, AHugeLeafIsOneEntry) {
  Tlb tlb(4);
  tlb.Insert(Leaf(k2M, k2M, 0));
  for (uint64_t off = 0; off < k2M; off += kPage) ASSERT_TRUE(tlb.Lookup(k2M + off).has_value());
  EXPECT_EQ(tlb.size(), 1u);
  EXPECT_EQ(tlb.stats().hits, 512u);
}

TEST(Tlb, EvictsTheLeastRecentlyUsedEntry) {
  Tlb tlb(4);
  for (uint64_t i = 0; i < 4; ++i) tlb.Insert(Leaf(i * kPage, kPage, i * kPage));
  ASSERT_TRUE(tlb.Lookup(0).has_value());  // entry 0 becomes the most recent; entry 1 the oldest
  tlb.Insert(Leaf(4 * kPage, kPage, 0));
  EXPECT_EQ(tlb.stats().evictions, 1u);
  EXPECT_FALSE(tlb.Lookup(1 * kPage).has_value());
  for (uint64_t i : {0u, 2u, 3u, 4u}) EXPECT_TRUE(tlb.Lookup(i * kPage).has_value()) << i;
}

TEST(Tlb, InvalidateRangeDropsEveryOverlappingEntry) {
  Tlb tlb(8);
  tlb.Insert(Leaf(0, k2M, 0));              // overlaps [2 MiB - 4 KiB, 2 MiB + 4 KiB)
  tlb.Insert(Leaf(k2M, kPage, 0));          // overlaps
  tlb.Insert(Leaf(k2M + kPage, kPage, 0));  // just after the range
  tlb.Insert(Leaf(3 * k2M, k2M, 0));        // far away
  tlb.InvalidateRange(k2M - kPage, k2M + kPage);
  EXPECT_EQ(tlb.stats().shootdowns, 1u);
  EXPECT_EQ(tlb.stats().entries_invalidated, 2u);
  EXPECT_FALSE(tlb.Lookup(0x1000).has_value());
  EXPECT_FALSE(tlb.Lookup(k2M).has_value());
  EXPECT_TRUE(tlb.Lookup(k2M + kPage).has_value());
  EXPECT_TRUE(tlb.Lookup(3 * k2M).has_value());
  tlb.InvalidateAll();
  EXPECT_EQ(tlb.size(), 0u);
  EXPECT_EQ(tlb.stats().shootdowns, 2u);
}

TEST(Tlb, InsertReplacesOverlappingEntries) {
  Tlb tlb(8);
  tlb.Insert(Leaf(0, kPage, 0x1000));
  tlb.Insert(Leaf(kPage, kPage, 0x2000));
  tlb.Insert(Leaf(0, k2M, 0x400000));  // the range was remapped as one huge leaf
  EXPECT_EQ(tlb.size(), 1u);
  EXPECT_EQ(tlb.Lookup(kPage)->CpuAddress(kPage), 0x401000u);
}

// ---- DeviceMmu: translation and shootdown ------------------------------------------------------

class DeviceMmuTest : public testing::Test {
 protected:
  DeviceMmu mmu_{DeviceMmu::Options{.compute_units = 2, .tlb_entries = 16}};
};

TEST_F(DeviceMmuTest, TheSecondTranslationOfAPageHitsTheTlb) {
  ASSERT_TRUE(mmu_.Map(0x10000, kPage, SystemPte(0x7000)).ok());
  {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
    Result<Translation> first = access.Translate(0x10008, Access::kRead);
    Result<Translation> second = access.Translate(0x10ff0, Access::kWrite);
    ASSERT_TRUE(first.ok());
    ASSERT_TRUE(second.ok());
    EXPECT_EQ(first->CpuAddress(0x10008), 0x7008u);
    EXPECT_EQ(*first, *second);
  }
  DeviceMmu::Stats s = mmu_.stats();
  EXPECT_EQ(s.translations, 2u);
  EXPECT_EQ(s.tlb_misses, 1u);
  EXPECT_EQ(s.walks, 1u);
  EXPECT_EQ(s.tlb_hits, 1u);
}

TEST_F(DeviceMmuTest, A2MiBLeafCostsOneWalkAndEachComputeUnitHasItsOwnTlb) {
  ASSERT_TRUE(mmu_.Map(k2M, k2M, SystemPte(4 * k2M)).ok());
  for (unsigned cu = 0; cu < 2; ++cu) {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(cu);
    for (uint64_t off = 0; off < k2M; off += kPage) {
      ASSERT_TRUE(access.Translate(k2M + off, Access::kRead).ok());
    }
  }
  DeviceMmu::Stats s = mmu_.stats();
  EXPECT_EQ(s.walks, 2u);  // one per compute unit
  EXPECT_EQ(s.tlb_hits, 2u * 511);
}

TEST_F(DeviceMmuTest, UnmapShootsDownCachedTranslations) {
  ASSERT_TRUE(mmu_.Map(0x20000, 4 * kPage, SystemPte(0x40000)).ok());
  for (unsigned cu = 0; cu < 2; ++cu) {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(cu);
    ASSERT_TRUE(access.Translate(0x21000, Access::kRead).ok());  // cached now
  }
  const uint64_t gen = mmu_.generation();
  ASSERT_TRUE(mmu_.Unmap(0x21000, kPage).ok());
  EXPECT_EQ(mmu_.generation(), gen + 1);
  DeviceMmu::Stats s = mmu_.stats();
  EXPECT_EQ(s.tlb_entries_invalidated, 2u);  // one entry in each TLB
  EXPECT_EQ(s.shootdowns, 2u);               // the Map and the Unmap
  for (unsigned cu = 0; cu < 2; ++cu) {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(cu);
    Result<Translation> gone = access.Translate(0x21000, Access::kRead);
    EXPECT_EQ(gone.errno_value(), EFAULT);
    EXPECT_TRUE(access.Translate(0x22000, Access::kRead).ok());
  }
  EXPECT_EQ(mmu_.stats().not_mapped, 2u);
}

TEST_F(DeviceMmuTest, ProtectShootsDownAndTheNextTranslationSeesTheNewPermissions) {
  ASSERT_TRUE(mmu_.Map(0, k2M, SystemPte(0)).ok());
  {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
    ASSERT_TRUE(access.Translate(0x3000, Access::kWrite).ok());  // the 2 MiB leaf is cached
  }
  ASSERT_TRUE(mmu_.Protect(0x3000, kPage, Perm::kRead).ok());
  DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
  EXPECT_EQ(access.Translate(0x3000, Access::kWrite).errno_value(), EPERM);
  EXPECT_TRUE(access.Translate(0x3000, Access::kRead).ok());
  EXPECT_TRUE(access.Translate(0x4000, Access::kWrite).ok());  // the rest of the split leaf
}

TEST_F(DeviceMmuTest, MissingWriteOrAtomicPermissionIsEperm) {
  ASSERT_TRUE(mmu_.Map(0x0000, kPage, SystemPte(0x1000, Perm::kRead)).ok());
  ASSERT_TRUE(mmu_.Map(0x1000, kPage, SystemPte(0x2000, Perm::kRead | Perm::kWrite)).ok());
  ASSERT_TRUE(mmu_.Map(0x2000, kPage, SystemPte(0x3000, Perm::kAll)).ok());
  ASSERT_TRUE(mmu_.Map(0x3000, kPage, SystemPte(0x4000, Perm::kNone)).ok());
  {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(1);
    EXPECT_TRUE(access.Translate(0x0000, Access::kRead).ok());
    EXPECT_EQ(access.Translate(0x0000, Access::kWrite).errno_value(), EPERM);
    EXPECT_EQ(access.Translate(0x0000, Access::kAtomic).errno_value(), EPERM);
    EXPECT_TRUE(access.Translate(0x1000, Access::kWrite).ok());
    EXPECT_EQ(access.Translate(0x1000, Access::kAtomic).errno_value(), EPERM);
    EXPECT_TRUE(access.Translate(0x2000, Access::kAtomic).ok());
    EXPECT_EQ(access.Translate(0x3000, Access::kRead).errno_value(), EPERM);
    EXPECT_EQ(access.Translate(0x4000, Access::kRead).errno_value(), EFAULT);
  }
  EXPECT_EQ(mmu_.stats().permission_denied, 4u);
}

TEST_F(DeviceMmuTest, AMapThatAddsPermissionsIsSeenDespiteACachedReadOnlyEntry) {
  ASSERT_TRUE(mmu_.Map(0x8000, kPage, SystemPte(0x1000, Perm::kRead)).ok());
  {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
    ASSERT_EQ(access.Translate(0x8000, Access::kWrite).errno_value(), EPERM);  // cached read-only
  }
  ASSERT_TRUE(mmu_.Map(0x8000, kPage, SystemPte(0x5000, Perm::kAll)).ok());
  DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
  Result<Translation> t = access.Translate(0x8000, Access::kAtomic);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->CpuAddress(0x8010), 0x5010u);
}

TEST_F(DeviceMmuTest, InvalidateDropsTlbEntriesButKeepsTheTable) {
  ASSERT_TRUE(mmu_.Map(0x8000, kPage, SystemPte(0x1000)).ok());
  {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
    ASSERT_TRUE(access.Translate(0x8000, Access::kRead).ok());
  }
  ASSERT_TRUE(mmu_.Invalidate(0x8000, 0x9000).ok());
  {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
    ASSERT_TRUE(access.Translate(0x8000, Access::kRead).ok());
  }
  EXPECT_EQ(mmu_.stats().walks, 2u);
  mmu_.InvalidateAll();
  {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
    ASSERT_TRUE(access.Translate(0x8000, Access::kRead).ok());
  }
  EXPECT_EQ(mmu_.stats().walks, 3u);
  EXPECT_EQ(mmu_.Invalidate(0x8000, 0x8000).errno_value(), EINVAL);
  EXPECT_EQ(mmu_.Invalidate(0x8001, 0x9000).errno_value(), EINVAL);
}

TEST_F(DeviceMmuTest, FailedChangesDoNotCountAndSuccessfulOnesBumpTheGeneration) {
  const uint64_t gen = mmu_.generation();
  EXPECT_EQ(mmu_.Map(0x1001, kPage, SystemPte(0)).errno_value(), EINVAL);
  EXPECT_EQ(mmu_.Unmap(0, 0).errno_value(), EINVAL);
  EXPECT_EQ(mmu_.Protect(kVaLimit, kPage, Perm::kNone).errno_value(), EINVAL);
  EXPECT_EQ(mmu_.generation(), gen);
  EXPECT_EQ(mmu_.stats().shootdowns, 0u);
  ASSERT_TRUE(mmu_.Map(0, kPage, SystemPte(0)).ok());
  ASSERT_TRUE(mmu_.Protect(0, kPage, Perm::kRead).ok());
  ASSERT_TRUE(mmu_.Unmap(0, kPage).ok());
  EXPECT_EQ(mmu_.generation(), gen + 3);
  EXPECT_EQ(mmu_.stats().changes, gen + 3);
}

TEST_F(DeviceMmuTest, UpdateAppliesSeveralTableChangesAsOne) {
  ASSERT_TRUE(mmu_.Map(0, 2 * kPage, SystemPte(0x10000)).ok());
  {
    DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
    ASSERT_TRUE(access.Translate(kPage, Access::kRead).ok());
  }
  // Migrate the second page to device page 7: unmap + map under one lock hold and one shootdown.
  Status st = mmu_.Update(kPage, 2 * kPage, [](DevicePageTable& table) {
    HMMKIT_RETURN_IF_ERROR(table.Unmap(kPage, kPage));
    return table.Map(kPage, kPage,
                     Pte{.target = 7, .target_kind = Target::kLocal, .perms = Perm::kAll});
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
  DeviceMmu::AccessGuard access = mmu_.BeginAccess(0);
  Result<Translation> t = access.Translate(kPage + 0x10, Access::kAtomic);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->pte.target_kind, Target::kLocal);
  EXPECT_EQ(t->LocalPage(kPage + 0x10), 7u);
}

TEST_F(DeviceMmuTest, LookupAndForEachSeeTheTable) {
  ASSERT_TRUE(mmu_.Map(k2M, k2M, SystemPte(0)).ok());
  ASSERT_TRUE(mmu_.Map(0x1000, kPage, SystemPte(0x1000)).ok());
  std::optional<Translation> t = mmu_.Lookup(k2M + 5);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->size, k2M);
  std::vector<uint64_t> bases;
  mmu_.ForEach(0, kVaLimit, [&](uint64_t va, uint64_t, const Pte&) { bases.push_back(va); });
  EXPECT_EQ(bases, (std::vector<uint64_t>{0x1000, k2M}));
  EXPECT_EQ(mmu_.stats().table.leaves[1], 1u);
}

using DeviceMmuDeathTest = DeviceMmuTest;

TEST_F(DeviceMmuDeathTest, MisuseAbortsInsteadOfDeadlocking) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH({ auto access = mmu_.BeginAccess(2); }, "out of range");
  EXPECT_DEATH(
      {
        auto access = mmu_.BeginAccess(0);
        mmu_.Unmap(0, kPage).IgnoreError();
      },
      "holding an AccessGuard");
  EXPECT_DEATH(
      {
        auto access = mmu_.BeginAccess(0);
        auto again = mmu_.BeginAccess(1);
      },
      "already holds");
}

// ---- DeviceMmu: concurrency --------------------------------------------------------------------

TEST(DeviceMmuConcurrency, AChangeWaitsForTheAccessInFlight) {
  DeviceMmu mmu(DeviceMmu::Options{.compute_units = 1});
  ASSERT_TRUE(mmu.Map(0x10000, kPage, SystemPte(0x7000)).ok());
  std::atomic<bool> unmapped{false};
  std::thread driver;
  {
    // Given a compute unit in the middle of an access,
    DeviceMmu::AccessGuard access = mmu.BeginAccess(0);
    ASSERT_TRUE(access.Translate(0x10000, Access::kRead).ok());
    // when the driver unmaps the page,
    driver = std::thread([&] {
      ASSERT_TRUE(mmu.Unmap(0x10000, kPage).ok());
      unmapped.store(true);
    });
    while (!access.ShouldYield()) std::this_thread::yield();
    // then the unmap has not returned and the page is still mapped for this access.
    EXPECT_FALSE(unmapped.load());
    EXPECT_TRUE(access.Translate(0x10000, Access::kRead).ok());
  }
  // Once the access ends, the unmap completes, and a new access faults.
  driver.join();
  EXPECT_TRUE(unmapped.load());
  DeviceMmu::AccessGuard access = mmu.BeginAccess(0);
  EXPECT_EQ(access.Translate(0x10000, Access::kRead).errno_value(), EFAULT);
}

TEST(DeviceMmuConcurrency, YieldLetsAWaitingChangeRun) {
  DeviceMmu mmu(DeviceMmu::Options{.compute_units = 1});
  ASSERT_TRUE(mmu.Map(0x10000, kPage, SystemPte(0x7000)).ok());
  std::atomic<bool> unmapped{false};
  DeviceMmu::AccessGuard access = mmu.BeginAccess(0);
  std::thread driver([&] {
    ASSERT_TRUE(mmu.Unmap(0x10000, kPage).ok());
    unmapped.store(true);
  });
  // A compute unit that holds its guard across a long batch yields between accesses; the waiting
  // Unmap gets its turn (without Yield this loop never ends).
  while (!unmapped.load()) {
    if (access.ShouldYield()) access.Yield();
  }
  EXPECT_EQ(access.Translate(0x10000, Access::kRead).errno_value(), EFAULT);
  driver.join();
}

// Compute units read through translations while the driver moves the range between two buffers
// and, after each move returns, poisons the buffer it moved away from. No unit may ever read the
// poison: that would be an access through a translation that outlived the change. Under TSan the
// poison writes also race with any such read, so the sanitizer checks the same property.
TEST(DeviceMmuConcurrency, NoComputeUnitUsesAStaleTranslationAfterAChangeReturns) {
  constexpr unsigned kUnits = 4;
  constexpr uint64_t kWords = 16 * kPage / sizeof(uint64_t);  // 16 pages per buffer
  constexpr uint64_t kVa = 0x40000000;
  constexpr uint64_t kPoison = 0xdeaddeaddeaddeadull;
  constexpr int kRounds = 150;
  constexpr uint64_t kReadsPerRound = 64;

  struct FreeDeleter {
    void operator()(uint64_t* p) const { std::free(p); }
  };
  auto alloc = [] {
    return std::unique_ptr<uint64_t[], FreeDeleter>(
        static_cast<uint64_t*>(std::aligned_alloc(kPage, kWords * sizeof(uint64_t))));
  };
  auto good = [](int buffer, uint64_t i) { return (uint64_t(buffer + 1) << 32) | i; };
  std::unique_ptr<uint64_t[], FreeDeleter> buffers[2] = {alloc(), alloc()};
  for (int b = 0; b < 2; ++b) {
    for (uint64_t i = 0; i < kWords; ++i) buffers[b][i] = good(b, i);
  }
  auto address_of = [&](int b) { return reinterpret_cast<uint64_t>(buffers[b].get()); };

  DeviceMmu mmu(DeviceMmu::Options{.compute_units = kUnits, .tlb_entries = 8});
  ASSERT_TRUE(mmu.Map(kVa, kWords * sizeof(uint64_t), SystemPte(address_of(0), Perm::kRead)).ok());

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0};
  std::atomic<uint64_t> bad_values{0};
  std::atomic<uint64_t> failed_translations{0};
  std::vector<std::thread> units;
  for (unsigned cu = 0; cu < kUnits; ++cu) {
    units.emplace_back([&, cu] {
      uint64_t i = cu * 97;
      while (!stop.load(std::memory_order_relaxed)) {
        // Odd units hold one guard per access; even units hold one guard per batch of 32 accesses
        // and yield to waiting changes between accesses.
        const int batch = cu % 2 == 0 ? 32 : 1;
        DeviceMmu::AccessGuard access = mmu.BeginAccess(cu);
        for (int k = 0; k < batch; ++k) {
          i = (i * 1103515245 + 12345) % kWords;
          const uint64_t va = kVa + i * sizeof(uint64_t);
          Result<Translation> t = access.Translate(va, Access::kRead);
          if (!t.ok()) {
            failed_translations.fetch_add(1);
            continue;
          }
          const uint64_t value = *reinterpret_cast<const uint64_t*>(t->CpuAddress(va));
          if (value != good(0, i) && value != good(1, i)) bad_values.fetch_add(1);
          reads.fetch_add(1, std::memory_order_relaxed);
          if (access.ShouldYield()) access.Yield();
        }
      }
    });
  }

  for (int round = 1; round <= kRounds; ++round) {
    const int now = round % 2;
    const int before = 1 - now;
    // The buffer we move to was restored while it was not mapped.
    ASSERT_TRUE(
        mmu.Map(kVa, kWords * sizeof(uint64_t), SystemPte(address_of(now), Perm::kRead)).ok());
    // Map returned: nobody may read `before` any more. Poison it,
    for (uint64_t i = 0; i < kWords; ++i) buffers[before][i] = kPoison;
    // let the units read for a while (through the new mapping only),
    const uint64_t target = reads.load() + kReadsPerRound;
    while (reads.load() < target) std::this_thread::yield();
    // and restore it before it is mapped again.
    for (uint64_t i = 0; i < kWords; ++i) buffers[before][i] = good(before, i);
  }
  stop.store(true);
  for (std::thread& t : units) t.join();

  EXPECT_EQ(bad_values.load(), 0u);
  EXPECT_EQ(failed_translations.load(), 0u);
  EXPECT_GE(reads.load(), kRounds * kReadsPerRound);
  DeviceMmu::Stats s = mmu.stats();
  EXPECT_EQ(s.shootdowns, uint64_t(kRounds) + 1);
  EXPECT_GT(s.tlb_hits, 0u);
}

}  // namespace
}  // namespace hmmkit::emu
