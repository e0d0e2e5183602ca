// Parity with hmm-tests: MIGRATE_TO_DEV / MIGRATE_TO_SYS / RELEASE of anonymous, private-file and
// THP memory, allocation failures, and migrated memory under mremap and partial munmap.
//
// Not here: hmm_gup_test (a FOLL_LONGTERM pin moves device pages back to system memory). Its
// user-space counterpart (the long-term pin API) is not reachable through the dmirror C API; it is
// covered by tests/unit/migrate_test.cpp, MigrateTest.LongTermPinMovesCoherentPagesBack.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "parity_fixture.hpp"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

namespace hmmkit::parity {
namespace {

// Success when no page of the snapshot is device memory.
::testing::AssertionResult NoDevicePages(const uint8_t* m, size_t npages) {
  for (size_t i = 0; i < npages; ++i)
    if (IsDevicePage(m[i]))
      return ::testing::AssertionFailure() << "page " << i << " is " << ProtString(m[i]);
  return ::testing::AssertionSuccess();
}

TEST_P(DmirrorParity, MigrateCopiesDataAndCpuReadsItBack) {
  // Given a written buffer
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  // When it migrates to the device
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  // Then every page moved and the device read the data back
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
  // And every page is now this device's memory
  ASSERT_EQ(Run(kSnapshot, b), 0);
  for (size_t i = 0; i < n; ++i)
    ASSERT_EQ(ProtString(b.bounce_bytes()[i] & ~HMM_DMIRROR_PROT_PMD),
              ProtString(local_kind() | HMM_DMIRROR_PROT_WRITE))
        << "page " << i;
  // And the CPU reads the data (device-private pages fault back)
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

// hmm-tests' migrate_file_private expects the CPU's copy-on-write pages of a private file mapping
// to migrate. hmmkit cannot: once such a page is zapped, a CPU touch maps the file's page again
// without any fault reaching the monitor (regular files cannot be registered with userfaultfd, and
// shmem raises MISSING only when the page cache has no page), so the device copy would be lost.
// hmmkit leaves these pages in place and the device reports ENOENT (docs/migration.md).
TEST_P(DmirrorParity, MigrateOfPrivateFileMappingIsRefused) {
  for (const char* dir : {"/tmp", "/dev/shm"}) {
    SCOPED_TRACE(dir);
    // Given a MAP_PRIVATE mapping of an empty file that the CPU wrote
    const size_t n = DefaultPages();
    TmpFile f(dir, n * PageSize());
    ASSERT_TRUE(f.ok());
    Buffer b(n, PROT_READ | PROT_WRITE, MAP_PRIVATE, f.fd());
    ASSERT_TRUE(b.mapped());
    FillInts(b.ints(), b.nints(), Seq);
    // When it is asked to migrate to the device
    hmm_dmirror_cmd cmd{};
    EXPECT_EQ(Run(kMigrateToDev, b, &cmd), ENOENT);
    // Then nothing is lost: the CPU reads its private data, which never reached the file
    EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
    std::vector<int> file(n * IntsPerPage(), -1);
    ASSERT_EQ(pread(f.fd(), file.data(), n * PageSize(), 0), ssize_t(n * PageSize()));
    EXPECT_TRUE(IntsAre(file.data(), file.size(), Zero)) << "file";
  }
}

TEST_P(DmirrorParity, MigrateCpuFaultsHalfBackMigrateAgain) {
  // Given a written buffer migrated to the device
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  ASSERT_EQ(cmd.cpages, n);
  // And the CPU read its first half (device-private pages come back to system memory)
  EXPECT_TRUE(IntsAre(b.ints(), b.nints() / 2, Seq));
  // When the whole buffer migrates again
  b.ClearBounce(0xFF);
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  // Then every page is on the device again, with its data
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq)) << "CPU";
}

TEST_P(DmirrorParity, MigrateThenReleaseKeepsData) {
  // Given a written buffer migrated to the device
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  ASSERT_EQ(cmd.cpages, n);
  // When the device releases its memory
  ASSERT_EQ(Run(kRelease, b), 0);
  // Then no page is device memory any more
  ASSERT_EQ(Run(kSnapshot, b), 0);
  EXPECT_TRUE(NoDevicePages(b.bounce_bytes(), n));
  // And the CPU reads the data
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

TEST_P(DmirrorParity, MigrateOfSharedAnonymousIsEnoent) {
  // Given a MAP_SHARED anonymous buffer
  Buffer b(DefaultPages(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  // When it is migrated
  // Then nothing migrates: ENOENT
  EXPECT_EQ(Run(kMigrateToDev, b), ENOENT);
  // And the data stays put
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

// hmm-tests' migrate_multiple: device-private pages come back through CPU faults, device-coherent
// pages (no CPU fault) through an explicit MIGRATE_TO_SYS.
TEST_P(DmirrorParity, MigrateTenTimes) {
  const size_t n = DefaultPages();
  for (int c = 0; c < 10; ++c) {
    SCOPED_TRACE("round " + std::to_string(c));
    // Given a fresh written buffer
    Buffer b(n);
    ASSERT_TRUE(b.mapped());
    FillInts(b.ints(), b.nints(), Seq);
    // When it migrates to the device
    hmm_dmirror_cmd cmd{};
    ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
    // Then every page moved, with its data
    ASSERT_EQ(cmd.cpages, n);
    ASSERT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
    // And it comes back to system memory with its data
    if (coherent()) {
      ASSERT_EQ(Run(kMigrateToSys, b, &cmd), 0);
      ASSERT_EQ(cmd.cpages, n);
    }
    ASSERT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
  }
}

TEST_P(DmirrorParity, MigrateToSysBringsPagesBack) {
  // Given a written buffer migrated to the device
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  ASSERT_EQ(cmd.cpages, n);
  // When it migrates back to system memory
  ASSERT_EQ(Run(kMigrateToSys, b, &cmd), 0);
  // Then every page moved, none is device memory and the CPU reads the data
  EXPECT_EQ(cmd.cpages, n);
  ASSERT_EQ(Run(kSnapshot, b), 0);
  EXPECT_TRUE(NoDevicePages(b.bounce_bytes(), n));
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

// hmm-tests' migrate_mixed (hmm2): what MIGRATE_TO_DEV refuses, and a page on another device.
TEST_P(DmirrorParity, MigrateMixedRangesAndAnotherDevicesPage) {
  DeviceHandle other(peer());
  ASSERT_TRUE(other.ok());
  // Given six PROT_NONE pages
  Buffer b = Buffer::BelowFreeGap(6, PROT_NONE);
  ASSERT_TRUE(b.mapped());
  auto migrate = [&](int handle, size_t first, size_t npages, hmm_dmirror_cmd* cmd = nullptr) {
    return Cmd(handle, kMigrateToDev, uintptr_t(b.page(first)), b.bounce(), npages, cmd);
  };
  // Then a range without read permission does not migrate: EINVAL
  EXPECT_EQ(migrate(other.get(), 0, 6), EINVAL) << "PROT_NONE";
  // Then a range with a hole (page 1 unmapped) does not migrate: EINVAL
  ASSERT_EQ(b.UnmapPart(b.page(1), PageSize()), 0);
  EXPECT_EQ(migrate(other.get(), 0, 3), EINVAL) << "hole";
  // Given page 2 the zero page (read-only), page 3 read-only data, pages 4-5 read-write data
  ASSERT_EQ(mprotect(b.page(2), PageSize(), PROT_READ), 0);
  ASSERT_EQ(*reinterpret_cast<volatile int*>(b.page(2)), 0);
  ASSERT_EQ(mprotect(b.page(3), PageSize(), PROT_READ | PROT_WRITE), 0);
  *reinterpret_cast<int*>(b.page(3)) = 3;
  ASSERT_EQ(mprotect(b.page(3), PageSize(), PROT_READ), 0);
  ASSERT_EQ(mprotect(b.page(4), 2 * PageSize(), PROT_READ | PROT_WRITE), 0);
  *reinterpret_cast<int*>(b.page(4)) = 4;
  *reinterpret_cast<int*>(b.page(5)) = 5;
  // When pages 2-5 migrate to the other device
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(migrate(other.get(), 2, 4, &cmd), 0);
  // Then all four moved
  EXPECT_EQ(cmd.cpages, 4u);
  // And page 5, now on the other device, does not migrate to this one: ENOENT
  EXPECT_EQ(migrate(dev_, 5, 1), ENOENT);
  // And the CPU still reads every page's data
  EXPECT_EQ(*reinterpret_cast<volatile int*>(b.page(2)), 0);
  EXPECT_EQ(*reinterpret_cast<volatile int*>(b.page(3)), 3);
  EXPECT_EQ(*reinterpret_cast<volatile int*>(b.page(4)), 4);
  EXPECT_EQ(*reinterpret_cast<volatile int*>(b.page(5)), 5);
}

// A PMD-aligned, PMD-sized THP candidate (MADV_HUGEPAGE), or a skip where the kernel has no THP.
#define THP_BUFFER_OR_SKIP(b, prot)                                    \
  Buffer b = Buffer::Aligned(PmdSize() / PageSize(), PmdSize(), prot); \
  ASSERT_TRUE((b).mapped());                                           \
  if (!AdviseHuge(b)) GTEST_SKIP() << "MADV_HUGEPAGE: " << strerror(errno)

// hmm-tests' migrate_anon_huge_empty.
TEST_P(DmirrorParity, MigrateEmptyThp) {
  // Given an empty, read-only THP candidate
  THP_BUFFER_OR_SKIP(b, PROT_READ);
  b.ClearBounce(0xFF);
  // When it migrates
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  // Then every page moved as a zero-filled device page
  EXPECT_EQ(cmd.cpages, b.npages());
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Zero));
  // And the CPU reads zeros
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Zero)) << "CPU";
}

// hmm-tests' migrate_anon_huge_zero.
TEST_P(DmirrorParity, MigrateThpOfTheZeroPage) {
  // Given a read-only THP candidate the CPU read (zero page or huge zero page)
  THP_BUFFER_OR_SKIP(b, PROT_READ);
  ASSERT_EQ(*reinterpret_cast<volatile int*>(b.data()), 0);
  b.ClearBounce(0xFF);
  // When it migrates
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  // Then every page moved as a zero-filled device page and the CPU reads zeros
  EXPECT_EQ(cmd.cpages, b.npages());
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Zero));
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Zero)) << "CPU";
}

// hmm-tests' migrate_anon_huge_free, plus a CPU read afterwards.
TEST_P(DmirrorParity, MadvFreeAfterThpMigration) {
  // Given a written THP candidate migrated to the device
  THP_BUFFER_OR_SKIP(b, PROT_READ | PROT_WRITE);
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  ASSERT_EQ(cmd.cpages, b.npages());
  ASSERT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
  if (coherent()) {
    // Coherent pages are a shared mapping of the device arena: the kernel refuses MADV_FREE on
    // it (a documented difference from the kernel's device-coherent pages), and nothing is lost.
    EXPECT_EQ(madvise(b.data(), b.size(), MADV_FREE), -1);
    EXPECT_EQ(errno, EINVAL);
    EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
    return;
  }
  // When the range is freed lazily
  ASSERT_EQ(madvise(b.data(), b.size(), MADV_FREE), 0) << strerror(errno);
  // Then the CPU reads each page as either its data or zeros (MADV_FREE may or may not drop it)
  for (size_t p = 0; p < b.npages(); ++p) {
    const int* page = reinterpret_cast<const int*>(b.page(p));
    if (!IntsAre(page, IntsPerPage(), Zero)) {
      EXPECT_TRUE(IntsAre(page, IntsPerPage(), Seq, p * IntsPerPage()))
          << "page " << p << " is neither its data nor zeros";
    }
  }
}

// hmm-tests' compound for a THP: a collapsed THP snapshots as a PMD mapping on every page.
TEST_P(DmirrorParity, CollapsedThpSnapshotsPmd) {
  // Given a written THP candidate collapsed into a THP
  THP_BUFFER_OR_SKIP(b, PROT_READ | PROT_WRITE);
  FillInts(b.ints(), b.nints(), Seq);
  if (madvise(b.data(), b.size(), MADV_COLLAPSE) != 0)
    GTEST_SKIP() << "MADV_COLLAPSE: " << strerror(errno);
  // When the device snapshots it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kSnapshot, b, &cmd), 0);
  // Then every page is WRITE|PMD
  EXPECT_EQ(cmd.cpages, b.npages());
  for (size_t i = 0; i < b.npages(); ++i)
    ASSERT_EQ(ProtString(b.bounce_bytes()[i]),
              ProtString(HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD))
        << "page " << i;
}

// hmm-tests' migrate_anon_huge_fault: a THP migrates as one device THP (device-private: a PMD
// device entry on every page) and faults back with its data.
TEST_P(DmirrorParity, MigrateCollapsedThpAndFaultBack) {
  // Given a written THP
  THP_BUFFER_OR_SKIP(b, PROT_READ | PROT_WRITE);
  FillInts(b.ints(), b.nints(), Seq);
  if (madvise(b.data(), b.size(), MADV_COLLAPSE) != 0)
    GTEST_SKIP() << "MADV_COLLAPSE: " << strerror(errno);
  // When it migrates
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  // Then every page moved with its data
  EXPECT_EQ(cmd.cpages, b.npages());
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
  if (!coherent()) {
    // And, device-private, every page snapshots as a local PMD device entry
    ASSERT_EQ(Run(kSnapshot, b, &cmd), 0);
    for (size_t i = 0; i < b.npages(); ++i)
      ASSERT_EQ(ProtString(b.bounce_bytes()[i]),
                ProtString(HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE |
                           HMM_DMIRROR_PROT_PMD))
          << "page " << i;
  }
  // And the CPU reads the data back
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq)) << "CPU";
}

// hmm-tests' migrate_anon_huge_err, first half: the huge device allocation fails once, and the THP
// migrates as small pages instead.
TEST_P(DmirrorParity, FailAllocThpMigratesAsSmallPages) {
  // Given a written THP candidate and a device told to fail its next allocation
  THP_BUFFER_OR_SKIP(b, PROT_READ | PROT_WRITE);
  FillInts(b.ints(), b.nints(), Seq);
  ASSERT_EQ(Cmd(dev_, kFlags, b.addr(), b.bounce(), HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  // When it migrates
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  // Then every page still moved, with its data
  EXPECT_EQ(cmd.cpages, b.npages());
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
  // And a single page faults back, then the rest
  EXPECT_EQ(*reinterpret_cast<volatile int*>(b.page(2)), int(2 * IntsPerPage()));
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq)) << "CPU";
}

// hmm-tests' migrate_anon_huge_err, second half: the system allocation fails once on the way back.
TEST_P(DmirrorParity, FailAllocOnMigrateBackStillMigrates) {
  // Given a written THP candidate on the device, and a device told to fail its next allocation
  THP_BUFFER_OR_SKIP(b, PROT_READ | PROT_WRITE);
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  ASSERT_EQ(cmd.cpages, b.npages());
  ASSERT_EQ(Cmd(dev_, kFlags, b.addr(), b.bounce(), HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  // When it migrates back to system memory
  // Then it succeeds and the CPU reads the data
  ASSERT_EQ(Run(kMigrateToSys, b, &cmd), 0);
  EXPECT_EQ(*reinterpret_cast<volatile int*>(b.page(2)), int(2 * IntsPerPage()));
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq)) << "CPU";
}

// hmm-tests' migrate_anon_huge_zero_err.
TEST_P(DmirrorParity, FailAllocThpOfTheZeroPage) {
  // Given a read-only THP candidate the CPU read, and a device told to fail its next allocation
  THP_BUFFER_OR_SKIP(b, PROT_READ);
  ASSERT_EQ(*reinterpret_cast<volatile int*>(b.data()), 0);
  b.ClearBounce(0xFF);
  ASSERT_EQ(Cmd(dev_, kFlags, b.addr(), b.bounce(), HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  // When it migrates
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
  // Then every page moved as zeros, and the CPU reads zeros
  EXPECT_EQ(cmd.cpages, b.npages());
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Zero));
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Zero)) << "CPU";
}

// hmm-tests' migrate_partial_unmap_fault: part of a migrated (THP) range is unmapped; the CPU reads
// the rest back.
TEST_P(DmirrorParity, PartialMunmapOfMigratedThpThenCpuReadsTheRest) {
  const size_t size = PmdSize();
  const size_t n = size / PageSize();
  for (bool thp : {false, true}) {
    for (size_t offset : {size_t{0}, size / 4, size / 2}) {
      SCOPED_TRACE((thp ? "THP, unmap at " : "small pages, unmap at ") + std::to_string(offset));
      // Given a written, PMD-aligned buffer migrated to the device
      Buffer b = Buffer::Aligned(n, size);
      ASSERT_TRUE(b.mapped());
      ASSERT_EQ(madvise(b.data(), size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), 0)
          << strerror(errno);
      FillInts(b.ints(), b.nints(), Seq);
      hmm_dmirror_cmd cmd{};
      ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
      ASSERT_EQ(cmd.cpages, n);
      ASSERT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
      // When half of it is unmapped
      ASSERT_EQ(b.UnmapPart(b.data() + offset, size / 2), 0);
      // Then the CPU reads the rest with its data
      const size_t lo = offset / sizeof(int), hi = (offset + size / 2) / sizeof(int);
      EXPECT_TRUE(IntsAre(b.ints(), lo, Seq)) << "before the hole";
      EXPECT_TRUE(IntsAre(b.ints() + hi, b.nints() - hi, Seq, hi)) << "after the hole";
    }
  }
}

// hmm-tests' migrate_remap_fault (migration before the move): a migrated range is moved with
// mremap; the CPU reads it at its new address. With MREMAP_DONTUNMAP the old range stays mapped
// and empty.
TEST_P(DmirrorParity, MremapOfMigratedRangeThenCpuFaultsBack) {
  const size_t size = PmdSize();
  const size_t n = size / PageSize();
  for (bool dont_unmap : {false, true}) {
    // MREMAP_DONTUNMAP keeps the old mapping of a shared mapping: the arena pages of a coherent
    // range would then be mapped twice (a documented limitation, docs/migration.md).
    if (dont_unmap && coherent()) continue;
    for (bool thp : {false, true}) {
      for (size_t offset : {size_t{0}, size / 4, size / 2}) {
        SCOPED_TRACE(std::string(dont_unmap ? "DONTUNMAP, " : "") + (thp ? "THP" : "small pages") +
                     ", moved to +" + std::to_string(size + offset));
        // Given a written, PMD-aligned buffer migrated to the device, in an area three times its
        // size
        Buffer area = Buffer::Aligned(3 * n, size);
        ASSERT_TRUE(area.mapped());
        char* old_addr = area.data();
        ASSERT_EQ(madvise(old_addr, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), 0)
            << strerror(errno);
        FillInts(area.ints(), size / sizeof(int), Seq);
        hmm_dmirror_cmd cmd{};
        ASSERT_EQ(Run(kMigrateToDev, area, n, &cmd), 0);
        ASSERT_EQ(cmd.cpages, n);
        ASSERT_TRUE(IntsAre(area.bounce_ints(), size / sizeof(int), Seq));
        // When it moves further into the area
        int flags = MREMAP_MAYMOVE | MREMAP_FIXED | (dont_unmap ? MREMAP_DONTUNMAP : 0);
        void* moved = mremap(old_addr, size, size, flags, old_addr + size + offset);
        ASSERT_NE(moved, MAP_FAILED) << strerror(errno);
        ASSERT_EQ(moved, old_addr + size + offset);
        // Then the CPU reads the data at the new address
        EXPECT_TRUE(IntsAre(static_cast<int*>(moved), size / sizeof(int), Seq)) << "new address";
        // And an old range left mapped reads zeros
        if (dont_unmap) {
          EXPECT_TRUE(IntsAre(area.ints(), size / sizeof(int), Zero)) << "old address";
        }
      }
    }
  }
}

}  // namespace
}  // namespace hmmkit::parity
