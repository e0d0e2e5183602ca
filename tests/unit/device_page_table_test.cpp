// DevicePageTable (driver/emu/include/hmmkit/emu/device_page_table.hpp): leaf sizes chosen from
// the alignment of address and target, splitting of huge leaves, freeing of empty table pages,
// argument checking, and a randomized comparison against a page-by-page reference model.
#include <array>
#include <cerrno>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/emu/device_page_table.hpp"

namespace hmmkit::emu {
namespace {

constexpr uint64_t kPage = kPageSize;
constexpr uint64_t k2M = LevelSpan(1);
constexpr uint64_t k1G = LevelSpan(2);

Pte SystemPte(uint64_t target, Perm perms = Perm::kRead | Perm::kWrite) {
  return Pte{.target = target, .target_kind = Target::kSystem, .perms = perms};
}
Pte LocalPte(uint64_t page_id, Perm perms = Perm::kRead | Perm::kWrite) {
  return Pte{.target = page_id, .target_kind = Target::kLocal, .perms = perms};
}

struct Leaf {
  uint64_t va;
  uint64_t size;
  Pte pte;
  friend bool operator==(const Leaf&, const Leaf&) = default;
};

std::vector<Leaf> Leaves(const DevicePageTable& pt, uint64_t start = 0, uint64_t end = kVaLimit) {
  std::vector<Leaf> out;
  pt.ForEach(start, end, [&](uint64_t va, uint64_t size, const Pte& pte) {
    out.push_back(Leaf{va, size, pte});
  });
  return out;
}

TEST(DevicePageTable, StartsEmptyWithOnlyTheRoot) {
  DevicePageTable pt;
  EXPECT_EQ(pt.stats().table_pages, 1u);
  EXPECT_EQ(pt.stats().leaves[0] + pt.stats().leaves[1] + pt.stats().leaves[2], 0u);
  EXPECT_FALSE(pt.Lookup(0).has_value());
  EXPECT_TRUE(Leaves(pt).empty());
}

TEST(DevicePageTable, TwoMiBAlignedRangeWithAlignedTargetIsOneLevel1Leaf) {
  // Given a 2 MiB-aligned device range and a 2 MiB-aligned system target,
  DevicePageTable pt;
  const uint64_t va = 7 * k2M;
  const uint64_t target = 0x7f0000000000 + 3 * k2M;
  // when it is mapped,
  ASSERT_TRUE(pt.Map(va, k2M, SystemPte(target)).ok());
  // then one 2 MiB leaf holds it, under root -> L2 table -> L1 table.
  EXPECT_EQ(pt.stats().leaves[1], 1u);
  EXPECT_EQ(pt.stats().leaves[0], 0u);
  EXPECT_EQ(pt.stats().table_pages, 3u);
  std::optional<Translation> t = pt.Lookup(va + 0x12345);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->va, va);
  EXPECT_EQ(t->size, k2M);
  EXPECT_EQ(t->pte.order, 9);
  EXPECT_EQ(t->pte.target, target);
  EXPECT_EQ(t->CpuAddress(va + 0x12345), target + 0x12345);
  EXPECT_FALSE(pt.Lookup(va - 1).has_value());
  EXPECT_FALSE(pt.Lookup(va + k2M).has_value());
}

TEST(DevicePageTable, OneGiBAlignedRangeIsOneLevel2Leaf) {
  DevicePageTable pt;
  const uint64_t va = 5 * k1G;
  const uint64_t first_id = 3 * (k1G / kPage);  // a device page id aligned to 1 GiB
  ASSERT_TRUE(pt.Map(va, k1G, LocalPte(first_id)).ok());
  EXPECT_EQ(pt.stats().leaves[2], 1u);
  EXPECT_EQ(pt.stats().leaves[1] + pt.stats().leaves[0], 0u);
  EXPECT_EQ(pt.stats().table_pages, 2u);
  std::optional<Translation> t = pt.Lookup(va + k1G - 1);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->size, k1G);
  EXPECT_EQ(t->pte.order, 18);
  EXPECT_EQ(t->LocalPage(va + k1G - 1), first_id + k1G / kPage - 1);
}

TEST(DevicePageTable, MisalignedTargetsFallBackTo4KiBLeaves) {
  DevicePageTable pt;
  // The device range is 2 MiB-aligned; the system target is off by one page.
  ASSERT_TRUE(pt.Map(0, k2M, SystemPte(k2M + kPage)).ok());
  EXPECT_EQ(pt.stats().leaves[1], 0u);
  EXPECT_EQ(pt.stats().leaves[0], 512u);
  // A local target whose first page id is not a multiple of 512.
  ASSERT_TRUE(pt.Map(k2M, k2M, LocalPte(513)).ok());
  EXPECT_EQ(pt.stats().leaves[1], 0u);
  EXPECT_EQ(pt.stats().leaves[0], 1024u);
  std::optional<Translation> t = pt.Lookup(k2M + 5 * kPage + 7);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->size, kPage);
  EXPECT_EQ(t->pte.target, 518u);
  EXPECT_EQ(t->pte.target_kind, Target::kLocal);
}

TEST(DevicePageTable, UnalignedRangeUsesTheLargestLeavesThatFit) {
  // [2 MiB - 4 KiB, 4 MiB + 4 KiB): a 4 KiB leaf, a 2 MiB leaf, a 4 KiB leaf.
  DevicePageTable pt;
  const uint64_t va = k2M - kPage;
  const uint64_t target = 10 * k2M - kPage;  // congruent with va modulo 2 MiB
  ASSERT_TRUE(pt.Map(va, k2M + 2 * kPage, SystemPte(target)).ok());
  EXPECT_EQ(pt.stats().leaves[0], 2u);
  EXPECT_EQ(pt.stats().leaves[1], 1u);
  std::vector<Leaf> leaves = Leaves(pt);
  ASSERT_EQ(leaves.size(), 3u);
  EXPECT_EQ(std::tie(leaves[0].va, leaves[0].size, leaves[0].pte.target),
            std::make_tuple(va, kPage, target));
  EXPECT_EQ(std::tie(leaves[1].va, leaves[1].size, leaves[1].pte.target),
            std::make_tuple(k2M, k2M, 10 * k2M));
  EXPECT_EQ(std::tie(leaves[2].va, leaves[2].size, leaves[2].pte.target),
            std::make_tuple(2 * k2M, kPage, 11 * k2M));
}

TEST(DevicePageTable, PartialUnmapOfA2MiBLeafSplitsItAndKeepsTheRest) {
  DevicePageTable pt;
  const uint64_t va = 4 * k2M;
  ASSERT_TRUE(pt.Map(va, k2M, LocalPte(3 * 512)).ok());
  ASSERT_EQ(pt.stats().leaves[1], 1u);
  // When pages 10 and 11 are unmapped,
  ASSERT_TRUE(pt.Unmap(va + 10 * kPage, 2 * kPage).ok());
  // then the leaf was split into 4 KiB leaves, 510 of which remain with their own page ids.
  EXPECT_EQ(pt.stats().splits, 1u);
  EXPECT_EQ(pt.stats().leaves[1], 0u);
  EXPECT_EQ(pt.stats().leaves[0], 510u);
  for (uint64_t i : {0u, 9u, 12u, 300u, 511u}) {
    std::optional<Translation> t = pt.Lookup(va + i * kPage + 8);
    ASSERT_TRUE(t.has_value()) << i;
    EXPECT_EQ(t->size, kPage);
    EXPECT_EQ(t->pte.target, 3 * 512 + i) << i;
    EXPECT_EQ(t->pte.perms, Perm::kRead | Perm::kWrite);
  }
  EXPECT_FALSE(pt.Lookup(va + 10 * kPage).has_value());
  EXPECT_FALSE(pt.Lookup(va + 11 * kPage + kPage - 1).has_value());
}

TEST(DevicePageTable, PartialUnmapOfA1GiBLeafSplitsOnlyWhatItMust) {
  DevicePageTable pt;
  const uint64_t va = 2 * k1G;
  const uint64_t target = 0x100000000000;  // 1 GiB-aligned
  ASSERT_TRUE(pt.Map(va, k1G, SystemPte(target, Perm::kAll)).ok());
  ASSERT_EQ(pt.stats().leaves[2], 1u);
  // One 4 KiB page in the middle of 2 MiB piece #100.
  const uint64_t hole = va + 100 * k2M + 17 * kPage;
  ASSERT_TRUE(pt.Unmap(hole, kPage).ok());
  EXPECT_EQ(pt.stats().splits, 2u);  // 1 GiB -> 512 x 2 MiB, then that piece -> 512 x 4 KiB
  EXPECT_EQ(pt.stats().leaves[2], 0u);
  EXPECT_EQ(pt.stats().leaves[1], 511u);
  EXPECT_EQ(pt.stats().leaves[0], 511u);
  EXPECT_FALSE(pt.Lookup(hole).has_value());
  for (uint64_t addr :
       {va, va + 99 * k2M + 5, hole - 1, hole + kPage, va + 101 * k2M + 0x777, va + k1G - 1}) {
    std::optional<Translation> t = pt.Lookup(addr);
    ASSERT_TRUE(t.has_value()) << std::hex << addr;
    EXPECT_EQ(t->CpuAddress(addr), target + (addr - va)) << std::hex << addr;
    EXPECT_EQ(t->pte.perms, Perm::kAll);
  }
  EXPECT_EQ(pt.Lookup(hole - 1)->size, kPage);
  EXPECT_EQ(pt.Lookup(va + 101 * k2M)->size, k2M);
}

TEST(DevicePageTable, ProtectSplitsAtTheEdgesOnlyWhenPermissionsChange) {
  DevicePageTable pt;
  ASSERT_TRUE(pt.Map(0, 2 * k2M, SystemPte(0x40000000)).ok());
  ASSERT_EQ(pt.stats().leaves[1], 2u);
  // Dropping write from [2 MiB - 8 KiB, 2 MiB + 4 KiB) splits both 2 MiB leaves.
  ASSERT_TRUE(pt.Protect(k2M - 2 * kPage, 3 * kPage, Perm::kRead).ok());
  EXPECT_EQ(pt.stats().splits, 2u);
  EXPECT_EQ(pt.stats().leaves[0], 1024u);
  EXPECT_EQ(pt.Lookup(k2M - 3 * kPage)->pte.perms, Perm::kRead | Perm::kWrite);
  EXPECT_EQ(pt.Lookup(k2M - 2 * kPage)->pte.perms, Perm::kRead);
  EXPECT_EQ(pt.Lookup(k2M)->pte.perms, Perm::kRead);
  EXPECT_EQ(pt.Lookup(k2M + kPage)->pte.perms, Perm::kRead | Perm::kWrite);
  EXPECT_EQ(pt.Lookup(k2M + kPage)->pte.target, 0x40000000 + k2M + kPage);
  // A mask that keeps everything changes nothing and splits nothing.
  ASSERT_TRUE(pt.Map(4 * k2M, k2M, SystemPte(0x80000000)).ok());
  ASSERT_TRUE(pt.Protect(4 * k2M + kPage, kPage, Perm::kRead | Perm::kWrite).ok());
  EXPECT_EQ(pt.stats().splits, 2u);
  // A whole leaf changes in place.
  ASSERT_TRUE(pt.Protect(4 * k2M, k2M, Perm::kNone).ok());
  EXPECT_EQ(pt.stats().splits, 2u);
  EXPECT_EQ(pt.Lookup(4 * k2M)->pte.perms, Perm::kNone);
  EXPECT_EQ(pt.Lookup(4 * k2M)->size, k2M);
}

TEST(DevicePageTable, MapOverAHugeLeafSplitsItAndRemappingCollapsesIt) {
  DevicePageTable pt;
  const uint64_t va = 8 * k2M;
  ASSERT_TRUE(pt.Map(va, k2M, SystemPte(0x200000)).ok());
  const uint64_t tables = pt.stats().table_pages;
  // One page in the middle moves to device memory.
  ASSERT_TRUE(pt.Map(va + 5 * kPage, kPage, LocalPte(42, Perm::kAll)).ok());
  EXPECT_EQ(pt.stats().splits, 1u);
  EXPECT_EQ(pt.stats().table_pages, tables + 1);
  EXPECT_EQ(pt.Lookup(va + 5 * kPage)->pte, LocalPte(42, Perm::kAll));
  EXPECT_EQ(pt.Lookup(va + 4 * kPage)->pte, SystemPte(0x200000 + 4 * kPage));
  EXPECT_EQ(pt.Lookup(va + 6 * kPage)->pte, SystemPte(0x200000 + 6 * kPage));
  // Mapping the whole 2 MiB again puts one leaf back and frees the level-0 table page.
  ASSERT_TRUE(pt.Map(va, k2M, SystemPte(0x400000)).ok());
  EXPECT_EQ(pt.stats().table_pages, tables);
  EXPECT_EQ(pt.stats().leaves[0], 0u);
  EXPECT_EQ(pt.stats().leaves[1], 1u);
  EXPECT_EQ(pt.Lookup(va + 5 * kPage)->pte.target, 0x400000u);
}

TEST(DevicePageTable, EmptyTablePagesAreFreed) {
  DevicePageTable pt;
  const uint64_t baseline = pt.stats().table_pages;
  // Mappings spread over different root entries, 1 GiB and 2 MiB regions.
  ASSERT_TRUE(pt.Map(0x1000, 3 * kPage, SystemPte(0x1000)).ok());
  ASSERT_TRUE(pt.Map(0x7fff00000000, k2M, SystemPte(0x600000)).ok());
  ASSERT_TRUE(pt.Map(kVaLimit - kPage, kPage, LocalPte(9)).ok());
  ASSERT_TRUE(pt.Map(3 * k1G, k1G + kPage, SystemPte(0)).ok());
  EXPECT_GT(pt.stats().table_pages, baseline + 5);
  // Unmapping a part leaves the rest alone,
  ASSERT_TRUE(pt.Unmap(0x1000, kPage).ok());
  EXPECT_TRUE(pt.Lookup(0x2000).has_value());
  // and unmapping everything (also through holes) frees every table page but the root.
  ASSERT_TRUE(pt.Unmap(0, kVaLimit).ok());
  EXPECT_EQ(pt.stats().table_pages, baseline);
  EXPECT_EQ(pt.stats().leaves[0] + pt.stats().leaves[1] + pt.stats().leaves[2], 0u);
  EXPECT_TRUE(Leaves(pt).empty());
  // Unmapping pieces one by one frees the tables as well.
  ASSERT_TRUE(pt.Map(k1G - kPage, 2 * kPage, SystemPte(0x9000)).ok());
  ASSERT_TRUE(pt.Unmap(k1G - kPage, kPage).ok());
  EXPECT_GT(pt.stats().table_pages, baseline);
  ASSERT_TRUE(pt.Unmap(k1G, kPage).ok());
  EXPECT_EQ(pt.stats().table_pages, baseline);
}

TEST(DevicePageTable, ForEachVisitsOverlappingLeavesInAddressOrder) {
  DevicePageTable pt;
  ASSERT_TRUE(pt.Map(6 * k1G, k1G, SystemPte(k1G)).ok());
  ASSERT_TRUE(pt.Map(0x5000, kPage, SystemPte(0x5000)).ok());
  ASSERT_TRUE(pt.Map(2 * k2M, k2M, LocalPte(0)).ok());
  ASSERT_TRUE(pt.Map(0x3000, kPage, SystemPte(0x9000)).ok());
  std::vector<Leaf> all = Leaves(pt);
  ASSERT_EQ(all.size(), 4u);
  EXPECT_EQ(all[0].va, 0x3000u);
  EXPECT_EQ(all[1].va, 0x5000u);
  EXPECT_EQ(all[2].va, 2 * k2M);
  EXPECT_EQ(all[3].va, 6 * k1G);
  EXPECT_EQ(all[3].size, k1G);
  // A window reports the leaves that overlap it, whole.
  std::vector<Leaf> some = Leaves(pt, 0x5800, 2 * k2M + 1);
  ASSERT_EQ(some.size(), 2u);
  EXPECT_EQ(some[0], all[1]);
  EXPECT_EQ(some[1], all[2]);
  EXPECT_TRUE(Leaves(pt, 0x6000, 2 * k2M).empty());
  EXPECT_EQ(Leaves(pt, 6 * k1G + 5, 6 * k1G + 6).size(), 1u);
}

TEST(DevicePageTable, RejectsBadRangesWithEinvalAndChangesNothing) {
  DevicePageTable pt;
  ASSERT_TRUE(pt.Map(k2M, k2M, SystemPte(0)).ok());
  const std::vector<Leaf> before = Leaves(pt);
  const DevicePageTable::Stats stats = pt.stats();

  EXPECT_EQ(pt.Map(0x1000, 0, SystemPte(0)).errno_value(), EINVAL);          // empty
  EXPECT_EQ(pt.Map(0x1001, kPage, SystemPte(0)).errno_value(), EINVAL);      // unaligned va
  EXPECT_EQ(pt.Map(0x1000, kPage + 1, SystemPte(0)).errno_value(), EINVAL);  // unaligned size
  EXPECT_EQ(pt.Map(kVaLimit - kPage, 2 * kPage, SystemPte(0)).errno_value(), EINVAL);  // > 48 bit
  EXPECT_EQ(pt.Map(kVaLimit, kPage, SystemPte(0)).errno_value(), EINVAL);
  EXPECT_EQ(pt.Map(~uint64_t{0} & ~(kPage - 1), kPage, SystemPte(0)).errno_value(),
            EINVAL);                                                   // overflows
  EXPECT_EQ(pt.Map(0, kPage, SystemPte(0x10)).errno_value(), EINVAL);  // target unaligned
  EXPECT_EQ(pt.Map(0, 2 * kPage, SystemPte(~uint64_t{0} & ~(kPage - 1))).errno_value(),
            EINVAL);  // target overflows
  EXPECT_EQ(pt.Map(0, 2 * kPage, LocalPte(~uint64_t{0})).errno_value(), EINVAL);
  EXPECT_EQ(pt.Unmap(k2M + 1, kPage).errno_value(), EINVAL);
  EXPECT_EQ(pt.Unmap(k2M, 0).errno_value(), EINVAL);
  EXPECT_EQ(pt.Unmap(k2M, kVaLimit).errno_value(), EINVAL);
  EXPECT_EQ(pt.Protect(k2M, kPage - 1, Perm::kNone).errno_value(), EINVAL);
  EXPECT_EQ(pt.Protect(kVaLimit - kPage, 2 * kPage, Perm::kNone).errno_value(), EINVAL);

  EXPECT_EQ(Leaves(pt), before);
  EXPECT_EQ(pt.stats().table_pages, stats.table_pages);
  EXPECT_EQ(pt.stats().leaves, stats.leaves);
  EXPECT_EQ(pt.stats().splits, stats.splits);
  EXPECT_FALSE(pt.Lookup(kVaLimit).has_value());
  EXPECT_FALSE(pt.Lookup(~uint64_t{0}).has_value());
}

// ---- Randomized comparison with a reference model --------------------------------------------

// The reference: one record per mapped 4 KiB page.
struct RefPage {
  Target kind;
  Perm perms;
  uint64_t target;  // of this page: CPU address or device page id
  friend bool operator==(const RefPage&, const RefPage&) = default;
};
using RefModel = std::map<uint64_t, RefPage>;

void RefMap(RefModel& ref, uint64_t va, uint64_t size, const Pte& first) {
  for (uint64_t off = 0; off < size; off += kPage) {
    const uint64_t target =
        first.target_kind == Target::kLocal ? first.target + off / kPage : first.target + off;
    ref[va + off] = RefPage{first.target_kind, first.perms, target};
  }
}

void RefUnmap(RefModel& ref, uint64_t va, uint64_t size) {
  ref.erase(ref.lower_bound(va), ref.lower_bound(va + size));
}

void RefProtect(RefModel& ref, uint64_t va, uint64_t size, Perm keep) {
  for (auto it = ref.lower_bound(va); it != ref.end() && it->first < va + size; ++it) {
    it->second.perms = it->second.perms & keep;
  }
}

// Expands the table's leaves that overlap [start, end) to pages and compares them with the
// reference pages in the same range (start and end must fall on leaf boundaries); also checks the
// leaf shape (aligned, order matching size). Returns the number of leaves per level it saw.
std::array<uint64_t, 3> ExpectMatches(const DevicePageTable& pt, const RefModel& ref,
                                      uint64_t start, uint64_t end) {
  std::vector<std::pair<uint64_t, RefPage>> pages;
  std::array<uint64_t, 3> leaves{};
  bool shape_ok = true;
  pt.ForEach(start, end, [&](uint64_t va, uint64_t size, const Pte& pte) {
    shape_ok &= va % size == 0 && size == (kPage << pte.order) &&
                (pte.order == 0 || pte.order == 9 || pte.order == 18);
    ++leaves[pte.order / 9];
    for (uint64_t off = 0; off < size; off += kPage) {
      const uint64_t target =
          pte.target_kind == Target::kLocal ? pte.target + off / kPage : pte.target + off;
      pages.emplace_back(va + off, RefPage{pte.target_kind, pte.perms, target});
    }
  });
  EXPECT_TRUE(shape_ok);
  auto it = ref.lower_bound(start);
  const auto last = ref.lower_bound(end);
  EXPECT_EQ(pages.size(), size_t(std::distance(it, last)));
  for (size_t i = 0; i < pages.size() && it != last; ++i, ++it) {
    if (pages[i].first != it->first || !(pages[i].second == it->second)) {
      ADD_FAILURE() << "first difference at page 0x" << std::hex << it->first;
      break;
    }
  }
  return leaves;
}

TEST(DevicePageTable, RandomOperationsMatchAPerPageReferenceModel) {
  // A 16 MiB window that straddles a 1 GiB boundary, so walks cross level-2 and level-1 tables.
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  constexpr uint64_t kBase = 3 * k1G - 8 * kMiB;
  constexpr uint64_t kWindowPages = 16 * kMiB / kPage;
  constexpr int kOps = 3000;
  const uint64_t seed = 0x5eed'1234;
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  auto rand = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };

  DevicePageTable pt;
  RefModel ref;
  uint64_t splits_seen = 0;
  for (int op = 0; op < kOps; ++op) {
    // A range: often 2 MiB-aligned and 2 MiB-sized multiples, so that huge leaves appear.
    uint64_t first_page = rand(kWindowPages);
    uint64_t pages = 1 + rand(rand(4) == 0 ? 1024 : 64);
    if (rand(3) == 0) {
      first_page &= ~uint64_t{511};
      pages = 512 * (1 + rand(3));
    }
    pages = std::min(pages, kWindowPages - first_page);
    const uint64_t va = kBase + first_page * kPage;
    const uint64_t size = pages * kPage;
    const int kind = int(rand(10));
    SCOPED_TRACE(testing::Message() << "op " << op << " kind " << kind << " va 0x" << std::hex << va
                                    << " size 0x" << size);
    if (kind < 5) {
      Pte first;
      first.target_kind = Target(rand(3));
      first.perms = Perm(rand(8));
      const bool congruent = rand(2) == 0;  // target aligned like va: huge leaves possible
      if (first.target_kind == Target::kLocal) {
        first.target = rand(uint64_t{1} << 30);
        if (congruent) first.target = (first.target & ~uint64_t{511}) + ((va / kPage) & 511);
      } else {
        first.target = rand(uint64_t{1} << 28) * kPage;
        if (congruent) first.target = (first.target & ~(k2M - 1)) + (va & (k2M - 1));
      }
      ASSERT_TRUE(pt.Map(va, size, first).ok());
      RefMap(ref, va, size, first);
    } else if (kind < 8) {
      ASSERT_TRUE(pt.Unmap(va, size).ok());
      RefUnmap(ref, va, size);
    } else {
      const Perm keep = Perm(rand(8));
      ASSERT_TRUE(pt.Protect(va, size, keep).ok());
      RefProtect(ref, va, size, keep);
    }
    // The neighbourhood of the change, page by page; every 16 operations the whole table and
    // the leaf counters.
    const uint64_t near_start = (va & ~(k2M - 1)) - k2M;
    const uint64_t near_end = ((va + size + k2M - 1) & ~(k2M - 1)) + k2M;
    ExpectMatches(pt, ref, near_start, near_end);
    if (op % 16 == 0 || op == kOps - 1) {
      EXPECT_EQ(ExpectMatches(pt, ref, 0, kVaLimit), pt.stats().leaves);
    }
    if (HasFailure()) return;
    // Random single lookups agree too.
    for (int k = 0; k < 4; ++k) {
      const uint64_t addr = kBase + rand(kWindowPages * kPage);
      std::optional<Translation> t = pt.Lookup(addr);
      auto it = ref.find(addr & ~(kPage - 1));
      ASSERT_EQ(t.has_value(), it != ref.end()) << std::hex << addr;
      if (t) {
        const uint64_t target = t->pte.target_kind == Target::kLocal
                                    ? t->LocalPage(addr)
                                    : t->CpuAddress(addr) & ~(kPage - 1);
        EXPECT_EQ(target, it->second.target);
      }
    }
    splits_seen = pt.stats().splits;
  }
  // The run exercised huge leaves and splits.
  EXPECT_GT(splits_seen, 10u);
  // Unmapping the window returns to the empty table.
  ASSERT_TRUE(pt.Unmap(kBase, kWindowPages * kPage).ok());
  EXPECT_EQ(pt.stats().table_pages, 1u);
  EXPECT_EQ(pt.stats().leaves[0] + pt.stats().leaves[1] + pt.stats().leaves[2], 0u);
}

}  // namespace
}  // namespace hmmkit::emu
