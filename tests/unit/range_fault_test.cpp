// RangeFault over real mappings of every kind, with and without REQ_FAULT/REQ_WRITE, against the
// kernel's hmm_range_fault semantics. The same binary runs again with the fallbacks forced
// (ctest's fallback.* tests: HMMKIT_DISABLE=pagemap_scan,procmap_query).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <map>

#include <gtest/gtest.h>

#include "flaky_sys.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/range_fault.hpp"
#include "recording_ops.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using namespace hmm_pfn;

constexpr uint64_t kR = kReqFault;
constexpr uint64_t kW = kReqFault | kReqWrite;

class RangeFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    as_ = MakeAddressSpace();
    ASSERT_NE(as_, nullptr);
  }
  void TearDown() override {
    if (as_ && sub_.inserted()) as_->notifiers().Remove(sub_);
  }

  // Subscribes over [start, end) (once) and runs one RangeFault with `default_flags`.
  Status Fault(uintptr_t start, uintptr_t end, uint64_t default_flags, std::vector<uint64_t>* out,
               uint64_t mask = 0) {
    if (!sub_.inserted()) {
      Status st = as_->notifiers().Insert(sub_, start, end - start, ops_);
      if (!st.ok()) return st;
    }
    out->resize((end - start) / PageSize());
    Range r;
    r.notifier = &sub_;
    r.notifier_seq = sub_.ReadBegin();
    r.start = start;
    r.end = end;
    r.hmm_pfns = *out;
    r.default_flags = default_flags;
    r.pfn_flags_mask = mask;
    r.dev_private_owner = owner_;
    return RangeFault(*as_, r);
  }
  uint64_t FaultOne(const void* p, uint64_t flags, int* err = nullptr) {
    std::vector<uint64_t> e;
    auto a = reinterpret_cast<uintptr_t>(p);
    Status st = Fault(a, a + PageSize(), flags, &e);
    if (err) *err = st.errno_value();
    EXPECT_TRUE(err || st.ok()) << st.ToString();
    return st.ok() ? e[0] : ~0ULL;
  }

  std::shared_ptr<AddressSpace> as_;
  RecordingOps ops_;
  IntervalNotifier sub_;
  const void* owner_ = &owner_;
};

bool Valid(uint64_t e) {
  return (e & kValid) != 0;
}
bool Writable(uint64_t e) {
  return (e & kWrite) != 0;
}

// ---- unmapped and PROT_NONE -------------------------------------------------------------------

TEST_F(RangeFaultTest, UnmappedPagesAreErrorEntriesWithoutFaultAndEFAULTWithFault) {
  const size_t pg = PageSize();
  Mapping m(3 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_EQ(m.UnmapPart(m.page(1), pg), 0);  // a hole in the middle
  std::vector<uint64_t> e;

  ASSERT_TRUE(Fault(m.addr(), m.end(), 0, &e).ok());
  EXPECT_EQ(e[0], 0u);
  EXPECT_EQ(e[1], kError);
  EXPECT_EQ(e[2], 0u);

  Status st = Fault(m.addr(), m.end(), kR, &e);
  EXPECT_EQ(st.errno_value(), EFAULT) << st.ToString();
}

TEST_F(RangeFaultTest, ProtNoneIsLikeNoVma) {
  Mapping m(PageSize(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  int err = 0;
  EXPECT_EQ(FaultOne(m.data(), 0, &err), kError);
  EXPECT_EQ(err, 0);
  FaultOne(m.data(), kR, &err);
  EXPECT_EQ(err, EFAULT);
}

// ---- private anonymous ------------------------------------------------------------------------

TEST_F(RangeFaultTest, UntouchedAnonSnapshotsAsNoneAndFaultsToTheZeroPage) {
  Mapping m(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_EQ(FaultOne(m.data(), 0), 0u);
  uint64_t e = FaultOne(m.data(), kR);
  EXPECT_TRUE(Valid(e));
  EXPECT_FALSE(Writable(e)) << "the zero page is never writable";
  EXPECT_EQ(Kind(e), PageKind::kZero);
}

TEST_F(RangeFaultTest, ZeroPageWithReqWriteBecomesAWritableSystemPage) {
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  (void)*static_cast<volatile char*>(m.data());  // maps the zero page
  EXPECT_EQ(Kind(FaultOne(m.data(), 0)), PageKind::kZero);
  uint64_t e = FaultOne(m.data(), kW);
  EXPECT_TRUE(Valid(e));
  EXPECT_TRUE(Writable(e));
  EXPECT_EQ(Kind(e), PageKind::kSystem);
  EXPECT_EQ(MapOrder(e), 0u);
}

TEST_F(RangeFaultTest, WrittenAnonIsValidAndWritableWithoutFaulting) {
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  m.data()[0] = 1;
  uint64_t e = FaultOne(m.data(), 0);
  EXPECT_TRUE(Valid(e));
  EXPECT_TRUE(Writable(e));
  EXPECT_EQ(Kind(e), PageKind::kSystem);
}

TEST_F(RangeFaultTest, ReadOnlyAnonFaultsForReadAndRefusesWriteWithEPERM) {
  Mapping m(PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_EQ(FaultOne(m.data(), 0), 0u);
  uint64_t e = FaultOne(m.data(), kR);
  EXPECT_TRUE(Valid(e));
  EXPECT_FALSE(Writable(e));
  int err = 0;
  FaultOne(m.data(), kW, &err);
  EXPECT_EQ(err, EPERM);
  // After mprotect to RW, the same write request succeeds.
  ASSERT_EQ(mprotect(m.data(), PageSize(), PROT_READ | PROT_WRITE), 0);
  EXPECT_TRUE(Writable(FaultOne(m.data(), kW)));
}

TEST_F(RangeFaultTest, ReqWriteWithoutReqFaultIsIgnoredLikeTheKernel) {
  Mapping m(PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  int err = -1;
  EXPECT_EQ(FaultOne(m.data(), kReqWrite, &err), 0u);
  EXPECT_EQ(err, 0);
}

TEST_F(RangeFaultTest, PerPageRequestsThroughPfnFlagsMask) {
  const size_t n = 8, pg = PageSize();
  Mapping m(n * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  std::vector<uint64_t> e(n);
  for (size_t i = 0; i < n; ++i) e[i] = i % 2 == 0 ? kW : 0;
  ASSERT_TRUE(Fault(m.addr(), m.end(), 0, &e, kReqMask).ok());
  for (size_t i = 0; i < n; ++i) {
    if (i % 2 == 0) {
      EXPECT_TRUE(Valid(e[i]) && Writable(e[i])) << i;
    } else {
      EXPECT_EQ(e[i], 0u) << i;
    }
  }
}

TEST_F(RangeFaultTest, AfterForkAWrittenPageIsReadOnlyUntilAWriteFaultBreaksCow) {
  if (const char* why = ForkWithMonitorUnavailableReason()) GTEST_SKIP() << why;
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  m.data()[0] = 5;
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    char c;
    (void)!read(pipefd[0], &c, 1);  // keep the page shared until the parent has looked
    _exit(0);
  }
  uint64_t shared = FaultOne(m.data(), kR);
  uint64_t broken = FaultOne(m.data(), kW);
  (void)!write(pipefd[1], "x", 1);
  waitpid(pid, nullptr, 0);
  close(pipefd[0]);
  close(pipefd[1]);

  EXPECT_TRUE(Valid(shared));
  EXPECT_FALSE(Writable(shared)) << "a COW-shared page must not be reported writable";
  EXPECT_TRUE(Writable(broken));
  EXPECT_EQ(m.data()[0], 5);
}

TEST_F(RangeFaultTest, TransparentHugePagesReportOrder9) {
  if (!ThpAvailable()) GTEST_SKIP() << "THP disabled";
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  ASSERT_EQ(madvise(m.data(), m.size(), MADV_HUGEPAGE), 0);
  m.data()[0] = 1;  // one fault maps the whole huge page
  std::vector<uint64_t> e;
  ASSERT_TRUE(Fault(m.addr(), m.end(), 0, &e).ok());
  if (MapOrder(e[0]) == 0) GTEST_SKIP() << "no huge page was allocated (fragmented memory)";
  for (size_t i = 0; i < e.size(); i += 97) {
    EXPECT_TRUE(Valid(e[i]) && Writable(e[i])) << i;
    EXPECT_EQ(MapOrder(e[i]), 9u) << i;
  }
}

TEST_F(RangeFaultTest, HugetlbPagesFaultInAndReportOrder9) {
  const KernelFeatures& f = as_->features();
  if (f.hugetlb_page_size != 2 * kMiB || f.hugetlb_free < 1)
    GTEST_SKIP() << "no free 2 MiB hugetlb page (vm.nr_hugepages)";
  void* p = mmap(nullptr, 2 * kMiB, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
  if (p == MAP_FAILED) GTEST_SKIP() << "MAP_HUGETLB: " << strerror(errno);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::vector<uint64_t> e;

  ASSERT_TRUE(Fault(a, a + 2 * kMiB, 0, &e).ok());
  EXPECT_EQ(e[0], 0u) << "untouched hugetlb memory is not present";
  Status st = Fault(a, a + 2 * kMiB, kW, &e);
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (size_t i = 0; i < e.size(); i += 101) {
    EXPECT_TRUE(Valid(e[i]) && Writable(e[i])) << i;
    EXPECT_EQ(MapOrder(e[i]), 9u) << i;
  }
  as_->notifiers().Remove(sub_);
  munmap(p, 2 * kMiB);
}

// ---- shared memory and files ------------------------------------------------------------------

TEST_F(RangeFaultTest, SharedAnonymousPagesAreWritableOnceFaulted) {
  Mapping m(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  EXPECT_EQ(FaultOne(m.data(), 0), 0u);
  uint64_t e = FaultOne(m.data(), kR);
  EXPECT_TRUE(Valid(e));
  EXPECT_TRUE(Writable(e));
  EXPECT_EQ(Kind(e), PageKind::kSystem);
}

TEST_F(RangeFaultTest, MemfdAndTmpfsFilesFaultAndReachTheSameBytes) {
  Mapping memfd = Mapping::Memfd(2 * PageSize());
  Mapping tmpfs = Mapping::TmpFile(2 * PageSize());
  for (Mapping* m : {&memfd, &tmpfs}) {
    uint64_t e = FaultOne(m->data(), kW);
    EXPECT_TRUE(Valid(e) && Writable(e));
    m->data()[0] = 'q';
    EXPECT_TRUE(Valid(FaultOne(m->data(), 0)));
    as_->notifiers().Remove(sub_);
  }
}

TEST_F(RangeFaultTest, PrivateFileMappingIsReadOnlyUntilWrittenThenACopy) {
  // A private mapping of a file with data: the page cache page is mapped read-only.
  char path[] = "/tmp/hmmkit-rf-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  unlink(path);
  std::vector<char> data(PageSize(), 'f');
  ASSERT_EQ(write(fd, data.data(), data.size()), ssize_t(data.size()));
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  close(fd);

  uint64_t read = FaultOne(m.data(), kR);
  EXPECT_TRUE(Valid(read));
  EXPECT_FALSE(Writable(read)) << "a page-cache page in a private mapping is not writable";
  uint64_t written = FaultOne(m.data(), kW);
  EXPECT_TRUE(Writable(written));
  EXPECT_EQ(m.data()[0], 'f');
}

// ---- protocol and arguments --------------------------------------------------------------------

TEST_F(RangeFaultTest, AMovedSequenceGivesEBUSY) {
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(as_->notifiers().Insert(sub_, m.addr(), m.size(), ops_).ok());
  std::vector<uint64_t> e(1);
  Range r;
  r.notifier = &sub_;
  r.notifier_seq = sub_.ReadBegin();
  r.start = m.addr();
  r.end = m.end();
  r.hmm_pfns = e;
  as_->notifiers().Invalidate(NotifierRange{m.addr(), m.end(), InvalidateEvent::kClear, nullptr});
  EXPECT_EQ(RangeFault(*as_, r).errno_value(), EBUSY);
  r.notifier_seq = sub_.ReadBegin();
  EXPECT_TRUE(RangeFault(*as_, r).ok());
}

TEST_F(RangeFaultTest, BadArgumentsGiveEINVAL) {
  Mapping m(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(as_->notifiers().Insert(sub_, m.addr(), m.size(), ops_).ok());
  std::vector<uint64_t> e(2);
  Range r;
  r.notifier = &sub_;
  r.notifier_seq = sub_.ReadBegin();
  r.hmm_pfns = e;
  r.start = m.addr() + 1;
  r.end = m.end();
  EXPECT_EQ(RangeFault(*as_, r).errno_value(), EINVAL);
  r.start = m.end();
  r.end = m.addr();
  EXPECT_EQ(RangeFault(*as_, r).errno_value(), EINVAL);
  r.start = m.addr();
  r.end = m.end();
  r.hmm_pfns = std::span<uint64_t>(e.data(), 1);
  EXPECT_EQ(RangeFault(*as_, r).errno_value(), EINVAL);
  r.hmm_pfns = e;
  r.notifier = nullptr;
  EXPECT_EQ(RangeFault(*as_, r).errno_value(), EINVAL);
}

TEST_F(RangeFaultTest, RangeFaultWatchesTheRangeBeforeReading) {
  if (as_->monitor() == nullptr) GTEST_SKIP() << "no userfaultfd";
  Mapping m(4 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  std::vector<uint64_t> e;
  ASSERT_TRUE(Fault(m.addr(), m.end(), kW, &e).ok());
  EXPECT_TRUE(as_->monitor()->IsWatched(m.addr(), m.end()));
  // A later unmap of a faulted page reaches the subscription.
  uint64_t seq = sub_.ReadBegin();
  ASSERT_EQ(munmap(m.page(3), PageSize()), 0);
  as_->monitor()->Sync();
  EXPECT_TRUE(sub_.ReadRetry(seq));
  munmap(m.data(), 3 * PageSize());
  m.Release();
}

TEST_F(RangeFaultTest, FaultsAreBatchedNotOneCallPerPage) {
  FlakySys sys;
  AddressSpace::Options o;
  o.sys = &sys;
  as_ = MakeAddressSpace(o);
  const size_t n = 64;
  Mapping m(n * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  m.page(10)[0] = 1;  // one page already present splits the need into two runs
  std::vector<uint64_t> e;
  ASSERT_TRUE(Fault(m.addr(), m.end(), kW, &e).ok());
  EXPECT_EQ(sys.populate_calls.load(), 2);
  for (uint64_t x : e) EXPECT_TRUE(Valid(x) && Writable(x));
  // The Sys must outlive the AddressSpace (its monitor thread reads through it).
  as_->notifiers().Remove(sub_);
  as_.reset();
}

// Device pages in range_fault entries are covered with real migrations in migrate_test.cpp.

}  // namespace
}  // namespace hmmkit::test
