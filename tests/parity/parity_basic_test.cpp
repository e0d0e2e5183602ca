// Parity with hmm-tests: device READ/WRITE of anonymous, THP, hugetlbfs and file memory, snapshots,
// two devices on one buffer, and a READ racing an munmap.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "parity_fixture.hpp"

namespace hmmkit::parity {
namespace {

TEST_P(DmirrorParity, AnonReadOfNoneZeroAndDataPagesFaultsOnce) {
  // Given a read-only buffer whose page 0 was never touched, page 1 maps the zero page (a CPU read)
  // and every other page holds data
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  const size_t data_from = 2 * IntsPerPage();
  for (size_t i = data_from; i < b.nints(); ++i) b.ints()[i] = int(i);
  ASSERT_EQ(mprotect(b.data(), b.size(), PROT_READ), 0);
  ASSERT_EQ(*reinterpret_cast<volatile int*>(b.page(1)), 0);
  // When the device reads it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kRead, b, &cmd), 0);
  // Then one fault round covered every page
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_EQ(cmd.faults, 1u);
  // And the device read zeros from the first two pages and the data from the rest
  EXPECT_TRUE(
      IntsAre(b.bounce_ints(), b.nints(), [&](size_t i) { return i < data_from ? 0 : int(i); }));
}

TEST_P(DmirrorParity, AnonReadOfProtNoneIsEfault) {
  // Given a written buffer protected PROT_NONE and a bounce buffer holding a marker
  Buffer b(DefaultPages());
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  FillInts(b.bounce_ints(), b.nints(), Neg);
  ASSERT_EQ(mprotect(b.data(), b.size(), PROT_NONE), 0);
  // When the device reads it
  // Then the read fails with EFAULT
  EXPECT_EQ(Run(kRead, b), EFAULT);
  // And the bounce buffer was not written, and the memory still holds its data
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Neg));
  ASSERT_EQ(mprotect(b.data(), b.size(), PROT_READ), 0);
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

TEST_P(DmirrorParity, AnonWriteFaultsOnceAndCpuSeesData) {
  // Given a fresh buffer and data in the bounce buffer
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.bounce_ints(), b.nints(), Seq);
  // When the device writes it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kWrite, b, &cmd), 0);
  // Then one fault round covered every page and the CPU sees the data
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

TEST_P(DmirrorParity, AnonWriteToReadOnlyIsEpermUntilMprotectRw) {
  // Given a read-only buffer whose first page the device already read (the zero page)
  const size_t n = DefaultPages();
  Buffer b(n, PROT_READ);
  ASSERT_TRUE(b.mapped());
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kRead, b, 1, &cmd), 0);
  EXPECT_EQ(cmd.cpages, 1u);
  EXPECT_EQ(cmd.faults, 1u);
  FillInts(b.bounce_ints(), b.nints(), Seq);
  // When the device writes it
  // Then the write fails with EPERM and the memory stays zero
  EXPECT_EQ(Run(kWrite, b), EPERM);
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Zero));
  // When the buffer is made writable and the device writes again
  ASSERT_EQ(mprotect(b.data(), b.size(), PROT_READ | PROT_WRITE), 0);
  ASSERT_EQ(Run(kWrite, b, &cmd), 0);
  // Then the write takes one fault round and the CPU sees the data
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

// hmm-tests' anon_read_multiple: every round reads a *fresh* buffer, so every READ starts from an
// empty mirror and takes exactly one fault round. (A CPU write to pages that are already writable
// changes no page-table entry and invalidates nothing, so rewriting one buffer would not make the
// next READ fault; that case is SecondReadOfMirroredRangeDoesNotFault below.)
TEST_P(DmirrorParity, RepeatedReadsOfFreshMemoryFaultOnceEach) {
  const size_t n = DefaultPages();
  for (int c = 0; c < 10; ++c) {
    SCOPED_TRACE("round " + std::to_string(c));
    // Given a fresh buffer written by the CPU with this round's data
    Buffer b(n);
    ASSERT_TRUE(b.mapped());
    FillInts(b.ints(), b.nints(), [c](size_t i) { return int(i) + c; });
    // When the device reads it
    hmm_dmirror_cmd cmd{};
    ASSERT_EQ(Run(kRead, b, &cmd), 0);
    // Then it faults once and reads this round's data
    EXPECT_EQ(cmd.cpages, n);
    EXPECT_EQ(cmd.faults, 1u);
    EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), [c](size_t i) { return int(i) + c; }));
  }
}

TEST_P(DmirrorParity, SecondReadOfMirroredRangeDoesNotFault) {
  // Given a written buffer the device has read once (one fault round)
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kRead, b, &cmd), 0);
  ASSERT_EQ(cmd.faults, 1u);
  b.ClearBounce(0xFF);
  // When the device reads the same range again
  ASSERT_EQ(Run(kRead, b, &cmd), 0);
  // Then its mirror already covers the range: no fault round, same data
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_EQ(cmd.faults, 0u);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
}

TEST_P(DmirrorParity, CpuWritesAfterDeviceReadAreSeenByTheNextRead) {
  // Given a written buffer the device has read
  Buffer b(DefaultPages());
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  ASSERT_EQ(Run(kRead, b), 0);
  // When the CPU overwrites it and the device reads again
  FillInts(b.ints(), b.nints(), Neg);
  ASSERT_EQ(Run(kRead, b), 0);
  // Then the device reads the CPU's new data (the mirror maps the same memory)
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Neg));
}

TEST_P(DmirrorParity, ThpWriteFaultsOnce) {
  // Given a PMD-aligned, PMD-sized buffer advised MADV_HUGEPAGE
  const size_t n = PmdSize() / PageSize();
  Buffer b = Buffer::Aligned(n, PmdSize());
  ASSERT_TRUE(b.mapped());
  if (!AdviseHuge(b)) GTEST_SKIP() << "MADV_HUGEPAGE: " << strerror(errno);
  FillInts(b.bounce_ints(), b.nints(), Seq);
  // When the device writes it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kWrite, b, &cmd), 0);
  // Then one fault round covered it and the CPU sees the data
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

// A 2 MiB MAP_HUGETLB buffer, or a skip where the system has no free huge page.
#define MAP_HUGETLB_OR_SKIP(b)                                     \
  Buffer b((size_t{2} << 20) / PageSize(), PROT_READ | PROT_WRITE, \
           MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB);             \
  if (!(b).mapped()) GTEST_SKIP() << "no 2 MiB hugetlbfs page: " << (b).mapped().message()

TEST_P(DmirrorParity, HugetlbWriteFaultsOnce) {
  // Given a hugetlbfs buffer and data in the bounce buffer
  MAP_HUGETLB_OR_SKIP(b);
  FillInts(b.bounce_ints(), b.nints(), Seq);
  // When the device writes it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kWrite, b, &cmd), 0);
  // Then one fault round covered it and the CPU sees the data
  EXPECT_EQ(cmd.cpages, b.npages());
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

TEST_P(DmirrorParity, HugetlbReadFaultsOnce) {
  // Given a hugetlbfs buffer the CPU wrote
  MAP_HUGETLB_OR_SKIP(b);
  FillInts(b.ints(), b.nints(), Seq);
  // When the device reads it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kRead, b, &cmd), 0);
  // Then one fault round covered it and the device read the data
  EXPECT_EQ(cmd.cpages, b.npages());
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
}

// hmm-tests' compound: a hugetlbfs page snapshots as one large mapping on every page.
TEST_P(DmirrorParity, HugetlbSnapshotIsHugeOnEveryPage) {
  // Given a written hugetlbfs buffer
  MAP_HUGETLB_OR_SKIP(b);
  FillInts(b.ints(), b.nints(), Seq);
  // When the device snapshots it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kSnapshot, b, &cmd), 0);
  EXPECT_EQ(cmd.cpages, b.npages());
  // Then every page is WRITE at one large level (PMD, or PUD for 1 GiB default pages)
  const uint8_t* m = b.bounce_bytes();
  const uint8_t level = (m[0] & HMM_DMIRROR_PROT_PUD) ? HMM_DMIRROR_PROT_PUD : HMM_DMIRROR_PROT_PMD;
  for (size_t i = 0; i < b.npages(); ++i)
    ASSERT_EQ(ProtString(m[i]), ProtString(HMM_DMIRROR_PROT_WRITE | level)) << "page " << i;
  // When it is made read-only and snapshot again
  ASSERT_EQ(mprotect(b.data(), b.size(), PROT_READ), 0);
  ASSERT_EQ(Run(kSnapshot, b, &cmd), 0);
  // Then every page is READ at the same level
  for (size_t i = 0; i < b.npages(); ++i)
    ASSERT_EQ(ProtString(m[i]), ProtString(HMM_DMIRROR_PROT_READ | level)) << "page " << i;
}

// The file tests run on a disk filesystem (/tmp) and on tmpfs (/dev/shm).
// tmpfs first: the monitor cannot see the unmap of a regular-file mapping (userfaultfd does not
// register those; see the table of what the monitor sees in docs/architecture.md), so a /tmp
// mapping unmapped first would leave the device a stale translation at an address the next mapping
// may reuse (it did: the second iteration then needed no fault).
const char* const kFileDirs[] = {"/dev/shm", "/tmp"};

TEST_P(DmirrorParity, FileReadThroughSharedMapping) {
  for (const char* dir : kFileDirs) {
    SCOPED_TRACE(dir);
    // Given a file holding data, mapped MAP_SHARED read-only
    const size_t n = DefaultPages();
    TmpFile f(dir, n * PageSize());
    ASSERT_TRUE(f.ok());
    std::vector<int> data(n * IntsPerPage());
    FillInts(data.data(), data.size(), Seq);
    ASSERT_EQ(pwrite(f.fd(), data.data(), n * PageSize(), 0), ssize_t(n * PageSize()));
    Buffer b(n, PROT_READ, MAP_SHARED, f.fd());
    ASSERT_TRUE(b.mapped());
    // When the device reads it
    hmm_dmirror_cmd cmd{};
    ASSERT_EQ(Run(kRead, b, &cmd), 0);
    // Then one fault round covered it and the device read the file's data
    EXPECT_EQ(cmd.cpages, n);
    EXPECT_EQ(cmd.faults, 1u);
    EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
  }
}

TEST_P(DmirrorParity, FileWriteReachesTheFile) {
  for (const char* dir : kFileDirs) {
    SCOPED_TRACE(dir);
    // Given an empty file mapped MAP_SHARED read-write and data in the bounce buffer
    const size_t n = DefaultPages();
    TmpFile f(dir, n * PageSize());
    ASSERT_TRUE(f.ok());
    Buffer b(n, PROT_READ | PROT_WRITE, MAP_SHARED, f.fd());
    ASSERT_TRUE(b.mapped());
    FillInts(b.bounce_ints(), b.nints(), Seq);
    // When the device writes it
    hmm_dmirror_cmd cmd{};
    ASSERT_EQ(Run(kWrite, b, &cmd), 0);
    // Then one fault round covered it, the CPU sees the data and so does the file
    EXPECT_EQ(cmd.cpages, n);
    EXPECT_EQ(cmd.faults, 1u);
    EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
    std::vector<int> back(n * IntsPerPage());
    ASSERT_EQ(pread(f.fd(), back.data(), n * PageSize(), 0), ssize_t(n * PageSize()));
    EXPECT_TRUE(IntsAre(back.data(), back.size(), Seq));
  }
}

// hmm-tests' mixedmap: pages the driver itself maps (mmap of the device) snapshot as READ.
TEST_P(DmirrorParity, DeviceMmapSnapshotsRead) {
  // Given one driver-owned page mapped read-only from the device
  void* p = hmm_dmirror_mmap(dev_, nullptr, PageSize(), PROT_READ, MAP_SHARED, 0);
  ASSERT_NE(p, MAP_FAILED) << strerror(errno);
  struct Unmapper {
    void* p;
    ~Unmapper() { munmap(p, PageSize()); }
  } unmap_at_exit{p};
  uint8_t m = 0xEE;
  // When the device snapshots it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Cmd(dev_, kSnapshot, reinterpret_cast<uintptr_t>(p), &m, 1, &cmd), 0);
  // Then it is READ
  EXPECT_EQ(cmd.cpages, 1u);
  EXPECT_EQ(ProtString(m), ProtString(HMM_DMIRROR_PROT_READ));
}

// hmm-tests' snapshot (hmm2): a snapshot faults nothing and tells each kind of page apart.
TEST_P(DmirrorParity, SnapshotOfSevenPageMix) {
  DeviceHandle other(peer());
  ASSERT_TRUE(other.ok());
  // Given seven pages:
  //   0: a hole (munmap)              1: mapped, never touched
  //   2: read by the CPU (zero page)  3: written, then made read-only
  //   4: written                      5: migrated to this device
  //   6: migrated to the other device of the same kind
  Buffer b = Buffer::BelowFreeGap(7);
  ASSERT_TRUE(b.mapped());
  ASSERT_EQ(b.UnmapPart(b.page(0), PageSize()), 0);
  ASSERT_EQ(*reinterpret_cast<volatile int*>(b.page(2)), 0);
  *reinterpret_cast<int*>(b.page(3)) = 3;
  ASSERT_EQ(mprotect(b.page(3), PageSize(), PROT_READ), 0);
  *reinterpret_cast<int*>(b.page(4)) = 4;
  *reinterpret_cast<int*>(b.page(5)) = 5;
  *reinterpret_cast<int*>(b.page(6)) = 6;
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Cmd(dev_, kMigrateToDev, uintptr_t(b.page(5)), b.bounce(), 1, &cmd), 0);
  ASSERT_EQ(cmd.cpages, 1u);
  ASSERT_EQ(Cmd(other.get(), kMigrateToDev, uintptr_t(b.page(6)), b.bounce(), 1, &cmd), 0);
  ASSERT_EQ(cmd.cpages, 1u);
  // When this device snapshots the seven pages
  b.ClearBounce(0xEE);
  ASSERT_EQ(Run(kSnapshot, b, &cmd), 0);
  EXPECT_EQ(cmd.cpages, 7u);
  // Then each page reads as its kind
  const uint8_t* m = b.bounce_bytes();
  EXPECT_EQ(ProtString(m[0]), ProtString(HMM_DMIRROR_PROT_ERROR));
  EXPECT_EQ(ProtString(m[1]), ProtString(HMM_DMIRROR_PROT_NONE));
  EXPECT_EQ(ProtString(m[2]), ProtString(HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ));
  EXPECT_EQ(ProtString(m[3]), ProtString(HMM_DMIRROR_PROT_READ));
  EXPECT_EQ(ProtString(m[4]), ProtString(HMM_DMIRROR_PROT_WRITE));
  EXPECT_EQ(ProtString(m[5]), ProtString(local_kind() | HMM_DMIRROR_PROT_WRITE));
  // A device-private page of another device is invisible (NONE); a coherent one is CPU memory
  // that belongs to the other device.
  EXPECT_EQ(ProtString(m[6]),
            ProtString(coherent() ? HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE
                                  : HMM_DMIRROR_PROT_NONE));
  // And the snapshot faulted nothing: the untouched page is still untouched
  ASSERT_EQ(Run(kSnapshot, b, &cmd), 0);
  EXPECT_EQ(ProtString(m[1]), ProtString(HMM_DMIRROR_PROT_NONE));
}

TEST_P(DmirrorParity, SnapshotOfProtNoneIsError) {
  // Given a mapped but PROT_NONE page between two written pages
  Buffer b(3);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  ASSERT_EQ(mprotect(b.page(1), PageSize(), PROT_NONE), 0);
  // When the device snapshots the three pages
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kSnapshot, b, &cmd), 0);
  // Then the PROT_NONE page is ERROR and its neighbours are WRITE
  const uint8_t* m = b.bounce_bytes();
  EXPECT_EQ(ProtString(m[0]), ProtString(HMM_DMIRROR_PROT_WRITE));
  EXPECT_EQ(ProtString(m[1]), ProtString(HMM_DMIRROR_PROT_ERROR));
  EXPECT_EQ(ProtString(m[2]), ProtString(HMM_DMIRROR_PROT_WRITE));
}

// hmm-tests' double_map (hmm2): two devices mirror one read-only buffer; one migrates it and the
// other still reads the right data (a device-private page of another device is faulted back).
TEST_P(DmirrorParity, TwoDevicesReadTheSameBufferAndOneMigratesIt) {
  DeviceHandle other(peer());
  ASSERT_TRUE(other.ok());
  // Given a written, read-only buffer
  const size_t n = 6;
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  ASSERT_EQ(mprotect(b.data(), b.size(), PROT_READ), 0);
  // When both devices read it
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kRead, b, &cmd), 0);
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq)) << "this device";
  b.ClearBounce(0xFF);
  ASSERT_EQ(Cmd(other.get(), kRead, b.addr(), b.bounce(), n, &cmd), 0);
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq)) << "other device";
  // And the other device migrates it
  b.ClearBounce(0xFF);
  ASSERT_EQ(Cmd(other.get(), kMigrateToDev, b.addr(), b.bounce(), n, &cmd), 0);
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq)) << "migrated";
  // Then this device reads the same data again, after one fault round (its mirror was invalidated)
  b.ClearBounce(0xFF);
  ASSERT_EQ(Run(kRead, b, &cmd), 0);
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq)) << "this device after the migration";
  // And the CPU reads it too
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq)) << "CPU";
}

// hmm-tests' anon_teardown: a thread unmaps the second half of a buffer while the device reads it.
// A READ either succeeds with the right data or fails with EFAULT; it never crashes and never
// returns wrong data. Once the unmap is done, READ fails with EFAULT.
TEST_P(DmirrorParity, ConcurrentMunmapDuringRead) {
  const size_t n = DefaultPages();
  for (int c = 0; c < 10; ++c) {
    SCOPED_TRACE("round " + std::to_string(c));
    // Given a written buffer
    Buffer b(n);
    ASSERT_TRUE(b.mapped());
    FillInts(b.ints(), b.nints(), [c](size_t i) { return int(i) + c; });
    auto want = [c](size_t i) { return int(i) + c; };
    // When a thread unmaps its second half as soon as the device has started reading
    std::atomic<bool> reading{false}, unmapped{false};
    std::thread unmapper([&] {
      while (!reading.load()) std::this_thread::yield();
      b.UnmapPart(b.page(n / 2), b.size() / 2);
      unmapped.store(true);
    });
    bool done = false;
    while (!done) {
      done = unmapped.load();  // one more READ after the unmap has completed
      b.ClearBounce(0xFF);
      reading.store(true);
      hmm_dmirror_cmd cmd{};
      int rc = Run(kRead, b, &cmd);
      // Then every READ succeeded with the right data or failed with EFAULT
      if (rc == 0) {
        EXPECT_EQ(cmd.cpages, n);
        EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints() / 2, want)) << "first half";
        EXPECT_TRUE(IntsAre(b.bounce_ints() + b.nints() / 2, b.nints() / 2, want, b.nints() / 2))
            << "second half of a READ that succeeded";
      } else {
        EXPECT_EQ(rc, EFAULT) << strerror(rc);
      }
      if (::testing::Test::HasFailure()) break;
    }
    unmapper.join();
    // And a READ after the unmap fails with EFAULT
    EXPECT_EQ(Run(kRead, b), EFAULT);
    // And the mapped half still reads right
    b.ClearBounce(0xFF);
    hmm_dmirror_cmd cmd{};
    ASSERT_EQ(Run(kRead, b, n / 2, &cmd), 0);
    EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints() / 2, want)) << "first half after the unmap";
    if (HasFailure()) break;
  }
}

}  // namespace
}  // namespace hmmkit::parity
