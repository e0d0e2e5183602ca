// AddressSpace::Snapshot / SnapshotInVma / Populate over real memory: what each page reads as after
// the CPU touched it (or not), exclusivity across fork, huge pages, argument and permission errors,
// and the retry of interrupted system calls. Every test runs with the mechanisms the kernel offers
// ("kernel") and with the pagemap and maps fallbacks forced ("fallback"); ctest also runs the whole
// binary with HMMKIT_DISABLE=pagemap_scan,procmap_query.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "flaky_sys.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "test_support.hpp"

namespace hmmkit {
namespace {

using test::kMiB;
using test::Mapping;
using test::PageSize;

enum class Mechanism { kKernel, kFallback };

std::string MechanismName(const ::testing::TestParamInfo<Mechanism>& info) {
  return info.param == Mechanism::kKernel ? "kernel" : "fallback";
}

// "present|zero|order=0" for failure messages.
std::string Describe(PageState s) {
  std::string out;
  auto add = [&](PageState::Flag f, const char* name) {
    if (s.has(f)) out += out.empty() ? name : std::string("|") + name;
  };
  add(PageState::kPresent, "present");
  add(PageState::kZero, "zero");
  add(PageState::kHuge, "huge");
  add(PageState::kSwapped, "swapped");
  add(PageState::kFile, "file");
  add(PageState::kExclusive, "exclusive");
  return (out.empty() ? "none" : out) + "|order=" + std::to_string(s.order);
}

// A private anonymous mapping kept out of THP (MADV_NOHUGEPAGE also keeps it from merging with its
// neighbours), so that its pages are mapped at order 0 whatever the THP mode.
Mapping SmallAnon(size_t pages, int prot = PROT_READ | PROT_WRITE) {
  Mapping m(pages * PageSize(), prot, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_EQ(madvise(m.data(), m.size(), MADV_NOHUGEPAGE), 0) << strerror(errno);
  return m;
}

void Touch(const Mapping& m, size_t page) {
  *reinterpret_cast<volatile char*>(m.page(page)) = 1;
}
char Peek(const Mapping& m, size_t page) {
  return *reinterpret_cast<volatile char*>(m.page(page));
}

// The AnonHugePages of the VMA at addr, from /proc/self/smaps (kB), independent of hmmkit.
long AnonHugeKb(uintptr_t addr) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool in = false;
  while (std::getline(smaps, line)) {
    unsigned long lo, hi;
    if (sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find('-') < 17) {
      in = addr >= lo && addr < hi;
      continue;
    }
    long kb;
    if (in && sscanf(line.c_str(), "AnonHugePages: %ld kB", &kb) == 1) return kb;
  }
  return 0;
}

bool HugeZeroPageEnabled() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/use_zero_page");
  int v = 0;
  return (f >> v) && v == 1;
}

class SnapshotTest : public ::testing::TestWithParam<Mechanism> {
 protected:
  void SetUp() override {
    features_ = KernelFeatures::Get();
    if (GetParam() == Mechanism::kFallback) {
      features_.pagemap_scan = false;
      features_.procmap_query = false;
    }
    as_ = Make({});
    ASSERT_NE(as_, nullptr);
  }

  std::shared_ptr<AddressSpace> Make(AddressSpace::Options options) {
    if (!options.features) options.features = &features_;
    options.start_monitor = false;
    return test::MakeAddressSpace(options);
  }

  // Snapshot of [start, end) through `as` (default: as_); fails the test on error.
  std::vector<PageState> Snap(uintptr_t start, uintptr_t end, AddressSpace* as = nullptr) {
    std::vector<PageState> out((end - start) / PageSize());
    Status st = (as ? as : as_.get())->Snapshot(start, end, out);
    EXPECT_TRUE(st.ok()) << st.ToString();
    return out;
  }
  std::vector<PageState> Snap(const Mapping& m) { return Snap(m.addr(), m.end()); }

  // Whether this configuration can tell the zero page from other pages.
  bool SeesZeroPage() const {
    return features_.pagemap_scan || (features_.pagemap_pfns && features_.zero_pfn != 0);
  }

  KernelFeatures features_;
  std::shared_ptr<AddressSpace> as_;
};

TEST_P(SnapshotTest, UntouchedAnonIsNotPresent) {
  // Given an anonymous mapping nobody touched
  Mapping m = SmallAnon(4);
  // When it is snapshotted
  auto pages = Snap(m);
  // Then every page reads as nothing
  for (size_t i = 0; i < pages.size(); ++i) EXPECT_EQ(pages[i].flags, 0) << i << Describe(pages[i]);
}

TEST_P(SnapshotTest, ReadFaultedAnonIsTheZeroPage) {
  // Given anonymous pages that were only read
  Mapping m = SmallAnon(4);
  for (size_t i = 0; i < 4; ++i) (void)Peek(m, i);
  // When they are snapshotted
  auto pages = Snap(m);
  // Then each is present, the shared zero page, never exclusive, not a file page
  for (size_t i = 0; i < pages.size(); ++i) {
    SCOPED_TRACE(Describe(pages[i]));
    EXPECT_TRUE(pages[i].present());
    if (SeesZeroPage()) {
      EXPECT_TRUE(pages[i].has(PageState::kZero));
    }
    EXPECT_FALSE(pages[i].has(PageState::kExclusive));
    EXPECT_FALSE(pages[i].has(PageState::kFile));
    EXPECT_FALSE(pages[i].has(PageState::kHuge));
  }
}

TEST_P(SnapshotTest, WrittenAnonIsPresentAndExclusive) {
  // Given anonymous pages of which the first and the third were written
  Mapping m = SmallAnon(4);
  Touch(m, 0);
  Touch(m, 2);
  // When they are snapshotted, with the default and with the always-read exclusivity check
  auto always = Make({.exclusive = ExclusiveCheck::kAlways});
  ASSERT_NE(always, nullptr);
  for (AddressSpace* as : {as_.get(), always.get()}) {
    auto pages = Snap(m.addr(), m.end(), as);
    // Then the written ones are present, exclusive, not the zero page; the others absent
    for (size_t i : {0u, 2u}) {
      SCOPED_TRACE(Describe(pages[i]));
      EXPECT_EQ(pages[i].flags, PageState::kPresent | PageState::kExclusive);
      EXPECT_EQ(pages[i].order, 0);
    }
    EXPECT_EQ(pages[1].flags, 0) << Describe(pages[1]);
    EXPECT_EQ(pages[3].flags, 0) << Describe(pages[3]);
  }
}

TEST_P(SnapshotTest, AfterForkAWrittenPageIsNotExclusive) {
  // Given a written private page, and a child process that shares it copy-on-write
  Mapping m = SmallAnon(2);
  Touch(m, 0);
  auto always = Make({.exclusive = ExclusiveCheck::kAlways});
  ASSERT_NE(always, nullptr);
  int go[2];
  ASSERT_EQ(pipe(go), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0) << strerror(errno);
  if (child == 0) {
    char c;
    while (read(go[0], &c, 1) < 0 && errno == EINTR) {
    }
    _exit(0);
  }
  close(go[0]);
  // When it is snapshotted while the child lives, under kAuto and kAlways
  auto auto_pages = Snap(m.addr(), m.end());
  auto always_pages = Snap(m.addr(), m.end(), always.get());
  EXPECT_GT(AddressSpace::fork_generation(), 0u);
  ASSERT_EQ(write(go[1], "x", 1), 1);
  close(go[1]);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  // Then it is present but not exclusive under both checks
  for (const auto& pages : {auto_pages, always_pages}) {
    SCOPED_TRACE(Describe(pages[0]));
    EXPECT_TRUE(pages[0].present());
    EXPECT_FALSE(pages[0].has(PageState::kExclusive));
    EXPECT_FALSE(pages[0].has(PageState::kZero));
  }
  // And once the child is gone, it is exclusive again (kAuto reads bit 56 now)
  auto after = Snap(m.addr(), m.end());
  EXPECT_TRUE(after[0].has(PageState::kExclusive)) << Describe(after[0]);
}

TEST_P(SnapshotTest, SharedPagesAreFilePages) {
  // Given a written MAP_SHARED anonymous page and a written memfd page
  Mapping shared(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  Mapping memfd = Mapping::Memfd(2 * PageSize());
  Touch(shared, 0);
  Touch(memfd, 1);
  // When they are snapshotted
  auto s = Snap(shared);
  auto f = Snap(memfd);
  // Then the written pages are present shared-memory pages, not the zero page; the others absent
  EXPECT_EQ(s[0].flags & (PageState::kPresent | PageState::kFile | PageState::kZero),
            PageState::kPresent | PageState::kFile)
      << Describe(s[0]);
  EXPECT_FALSE(s[1].present()) << Describe(s[1]);
  EXPECT_FALSE(f[0].present()) << Describe(f[0]);
  EXPECT_EQ(f[1].flags & (PageState::kPresent | PageState::kFile | PageState::kZero),
            PageState::kPresent | PageState::kFile)
      << Describe(f[1]);
}

TEST_P(SnapshotTest, PrivateFileMappingMixesPageCacheAndAnonPages) {
  // Given a private mapping of a file with one page read (page cache) and one written (a private
  // copy-on-write copy)
  Mapping m = Mapping::TmpFile(3 * PageSize(), "/dev/shm", MAP_PRIVATE);
  (void)Peek(m, 0);
  Touch(m, 1);
  // When it is snapshotted
  auto pages = Snap(m);
  // Then the read page is a file page and the written one a private, exclusive anonymous page
  EXPECT_EQ(pages[0].flags & (PageState::kPresent | PageState::kFile | PageState::kZero),
            PageState::kPresent | PageState::kFile)
      << Describe(pages[0]);
  EXPECT_EQ(pages[1].flags & ~PageState::kExclusive, PageState::kPresent) << Describe(pages[1]);
  EXPECT_TRUE(pages[1].has(PageState::kExclusive)) << Describe(pages[1]);
  EXPECT_FALSE(pages[2].present()) << Describe(pages[2]);
}

TEST_P(SnapshotTest, DontneedMakesPagesAbsentAgain) {
  // Given written anonymous pages
  Mapping m = SmallAnon(3);
  for (size_t i = 0; i < 3; ++i) Touch(m, i);
  ASSERT_TRUE(Snap(m)[1].present());
  // When the middle one is zapped with MADV_DONTNEED
  ASSERT_EQ(madvise(m.page(1), PageSize(), MADV_DONTNEED), 0);
  // Then it is absent again, its neighbours untouched
  auto pages = Snap(m);
  EXPECT_TRUE(pages[0].present());
  EXPECT_EQ(pages[1].flags, 0) << Describe(pages[1]);
  EXPECT_TRUE(pages[2].present());
}

TEST_P(SnapshotTest, HoleReadsAsZeros) {
  // Given three written pages whose middle one is then unmapped
  Mapping m = SmallAnon(3);
  for (size_t i = 0; i < 3; ++i) Touch(m, i);
  ASSERT_EQ(m.UnmapPart(m.page(1), PageSize()), 0);
  // When the whole range is snapshotted (out pre-filled with garbage)
  std::vector<PageState> pages(3, PageState{0xff, 0xff});
  Status st = as_->Snapshot(m.addr(), m.end(), pages);
  // Then the hole reads as 0 and both sides as present
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(pages[0].has(PageState::kExclusive)) << Describe(pages[0]);
  EXPECT_EQ(pages[1].flags, 0) << Describe(pages[1]);
  EXPECT_EQ(pages[1].order, 0);
  EXPECT_TRUE(pages[2].has(PageState::kExclusive)) << Describe(pages[2]);
}

TEST_P(SnapshotTest, SnapshotInVmaMatchesSnapshot) {
  // Given a VMA with a written, a read and an untouched page
  Mapping m = SmallAnon(3);
  Touch(m, 0);
  (void)Peek(m, 1);
  auto vma = as_->FindVma(m.addr());
  ASSERT_TRUE(vma.ok() && vma->has_value());
  // When it is snapshotted with and without the VMA lookup
  std::vector<PageState> in_vma(3);
  Status st = as_->SnapshotInVma(**vma, m.addr(), m.end(), in_vma);
  auto plain = Snap(m);
  // Then both agree page by page
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(in_vma[i].flags, plain[i].flags) << i;
    EXPECT_EQ(in_vma[i].order, plain[i].order) << i;
  }
  EXPECT_TRUE(in_vma[0].has(PageState::kExclusive));
  EXPECT_TRUE(in_vma[1].present());
  EXPECT_FALSE(in_vma[2].present());
}

TEST_P(SnapshotTest, BadArgumentsAreEinval) {
  Mapping m = SmallAnon(4);
  std::vector<PageState> out(4);
  const uintptr_t a = m.addr(), p = PageSize();
  // Given unaligned, empty, reversed ranges, and an output too small
  // When they are snapshotted, then each is EINVAL
  EXPECT_EQ(as_->Snapshot(a + 1, a + p, out).errno_value(), EINVAL);
  EXPECT_EQ(as_->Snapshot(a, a + p + 1, out).errno_value(), EINVAL);
  EXPECT_EQ(as_->Snapshot(a, a, out).errno_value(), EINVAL);
  EXPECT_EQ(as_->Snapshot(a + p, a, out).errno_value(), EINVAL);
  EXPECT_EQ(as_->Snapshot(a, a + 4 * p, std::span<PageState>(out).first(3)).errno_value(), EINVAL);
  // And SnapshotInVma of a range outside the given VMA is EINVAL
  auto vma = as_->FindVma(a);
  ASSERT_TRUE(vma.ok() && vma->has_value());
  Vma small = **vma;
  small.start = a;
  small.end = a + p;
  Status st = as_->SnapshotInVma(small, a, a + 2 * p, out);
  EXPECT_EQ(st.errno_value(), EINVAL);
  EXPECT_NE(st.message().find("not inside"), std::string::npos) << st.message();
}

TEST_P(SnapshotTest, TransparentHugePageIsOrder9) {
  if (!test::ThpAvailable()) GTEST_SKIP() << "THP unavailable";
  // Given a 2 MiB-aligned MADV_HUGEPAGE mapping with every page written
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  ASSERT_EQ(madvise(m.data(), m.size(), MADV_HUGEPAGE), 0);
  const size_t n = m.size() / PageSize();
  for (size_t i = 0; i < n; ++i) Touch(m, i);
  if (AnonHugeKb(m.addr()) < 2048) GTEST_SKIP() << "the kernel did not allocate a THP";
  // When it is snapshotted whole, and in part
  auto pages = Snap(m);
  auto part = Snap(m.addr() + 8 * PageSize(), m.addr() + 12 * PageSize());
  // Then every page is a present, exclusive page of an order-9 mapping
  for (size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(pages[i].has(PageState::kHuge)) << i << " " << Describe(pages[i]);
    ASSERT_EQ(pages[i].order, 9) << i;
    ASSERT_TRUE(pages[i].has(PageState::kPresent));
    ASSERT_TRUE(pages[i].has(PageState::kExclusive)) << i << " " << Describe(pages[i]);
    ASSERT_FALSE(pages[i].has(PageState::kZero));
  }
  for (const PageState& s : part) {
    EXPECT_TRUE(s.has(PageState::kHuge)) << Describe(s);
    EXPECT_EQ(s.order, 9);
  }
}

TEST_P(SnapshotTest, HugeZeroPageIsZeroAndOrder9) {
  if (!test::ThpAvailable() || !HugeZeroPageEnabled()) GTEST_SKIP() << "no huge zero page";
  if (!SeesZeroPage()) GTEST_SKIP() << "PFNs hidden: the fallback cannot see the zero page";
  // Given a 2 MiB-aligned MADV_HUGEPAGE mapping that was only read, once
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB, PROT_READ);
  ASSERT_EQ(madvise(m.data(), m.size(), MADV_HUGEPAGE), 0);
  (void)Peek(m, 0);
  // When it is snapshotted, also with /proc/kpageflags unused (PFN of the huge zero page learned)
  KernelFeatures no_kpf = features_;
  no_kpf.kpageflags = false;
  auto as2 = Make({.features = &no_kpf});
  ASSERT_NE(as2, nullptr);
  auto pages = Snap(m);
  if (!pages[1].present()) GTEST_SKIP() << "the kernel mapped the small zero page";
  auto pages2 = Snap(m.addr(), m.end(), as2.get());
  // Then every page is the zero page, mapped at order 9, never exclusive
  for (const auto* v : {&pages, &pages2}) {
    for (size_t i = 0; i < v->size(); ++i) {
      const PageState& s = (*v)[i];
      ASSERT_EQ(s.flags, PageState::kPresent | PageState::kZero | PageState::kHuge)
          << i << " " << Describe(s);
      ASSERT_EQ(s.order, 9);
    }
  }
}

TEST_P(SnapshotTest, HugetlbPagesCarryTheirOrder) {
  const KernelFeatures& f = as_->features();
  if (f.hugetlb_page_size == 0 || f.hugetlb_free == 0) GTEST_SKIP() << "no free hugetlb pages";
  // Given one written default-size hugetlb page
  Mapping m(f.hugetlb_page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB);
  ASSERT_NE(m.data(), nullptr);
  Touch(m, 0);
  // When it is snapshotted
  auto pages = Snap(m);
  // Then every base page is present at the huge page's order
  uint8_t order = uint8_t(__builtin_ctzl(f.hugetlb_page_size / PageSize()));
  for (size_t i = 0; i < pages.size(); ++i) {
    ASSERT_TRUE(pages[i].present()) << i;
    ASSERT_TRUE(pages[i].has(PageState::kHuge)) << i << " " << Describe(pages[i]);
    ASSERT_EQ(pages[i].order, order) << i;
  }
  // And a part of the huge page reads the same
  auto part = Snap(m.addr() + 4 * PageSize(), m.addr() + 8 * PageSize());
  for (const PageState& s : part) {
    EXPECT_TRUE(s.present() && s.has(PageState::kHuge)) << Describe(s);
    EXPECT_EQ(s.order, order);
  }
}

// ---- Populate ------------------------------------------------------------------------------

TEST_P(SnapshotTest, PopulateReadMakesZeroPages) {
  // Given untouched anonymous pages
  Mapping m = SmallAnon(4);
  // When they are populated for read
  Status st = as_->Populate(m.addr(), m.end(), /*write=*/false);
  // Then they are present zero pages
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (const PageState& s : Snap(m)) {
    EXPECT_TRUE(s.present()) << Describe(s);
    if (SeesZeroPage()) {
      EXPECT_TRUE(s.has(PageState::kZero)) << Describe(s);
    }
  }
}

TEST_P(SnapshotTest, PopulateWriteMakesPrivatePages) {
  // Given anonymous pages that were read (zero page) or untouched
  Mapping m = SmallAnon(4);
  (void)Peek(m, 1);
  // When they are populated for write
  Status st = as_->Populate(m.addr(), m.end(), /*write=*/true);
  // Then each is a present, exclusive page, not the zero page
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (const PageState& s : Snap(m))
    EXPECT_EQ(s.flags, PageState::kPresent | PageState::kExclusive) << Describe(s);
}

TEST_P(SnapshotTest, PopulateWriteOfSharedMemory) {
  // Given an untouched memfd mapping
  Mapping m = Mapping::Memfd(2 * PageSize());
  // When it is populated for write
  Status st = as_->Populate(m.addr(), m.end(), /*write=*/true);
  // Then its pages are present shared-memory pages
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (const PageState& s : Snap(m)) {
    EXPECT_TRUE(s.present()) << Describe(s);
    EXPECT_TRUE(s.has(PageState::kFile)) << Describe(s);
  }
}

TEST_P(SnapshotTest, PopulateWriteOnReadOnlyIsEperm) {
  // Given a read-only mapping
  Mapping m = SmallAnon(2, PROT_READ);
  // When it is populated for write
  Status st = as_->Populate(m.addr(), m.end(), /*write=*/true);
  // Then it is EPERM, and the message names the range and the reason
  EXPECT_EQ(st.errno_value(), EPERM) << st.ToString();
  EXPECT_NE(st.message().find("read-only"), std::string::npos) << st.message();
  char addr[32];
  snprintf(addr, sizeof addr, "%#lx", static_cast<unsigned long>(m.addr()));
  EXPECT_NE(st.message().find(addr), std::string::npos) << st.message();
  // And populating it for read works
  EXPECT_TRUE(as_->Populate(m.addr(), m.end(), /*write=*/false).ok());
}

TEST_P(SnapshotTest, PopulateOfProtNoneIsEfault) {
  // Given a PROT_NONE mapping
  Mapping m(2 * PageSize(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  // When it is populated for read or for write
  Status r = as_->Populate(m.addr(), m.end(), /*write=*/false);
  Status w = as_->Populate(m.addr(), m.end(), /*write=*/true);
  // Then both are EFAULT naming PROT_NONE
  EXPECT_EQ(r.errno_value(), EFAULT) << r.ToString();
  EXPECT_EQ(w.errno_value(), EFAULT) << w.ToString();
  EXPECT_NE(r.message().find("PROT_NONE"), std::string::npos) << r.message();
}

TEST_P(SnapshotTest, PopulateOfUnmappedIsEfault) {
  // Given an unmapped range, and a range whose second half is unmapped
  Mapping gone(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  uintptr_t hole = gone.addr();
  gone.Unmap();
  Mapping half = SmallAnon(4);
  ASSERT_EQ(half.UnmapPart(half.page(2), 2 * PageSize()), 0);
  // When they are populated
  Status a = as_->Populate(hole, hole + 2 * PageSize(), /*write=*/true);
  Status b = as_->Populate(half.addr(), half.end(), /*write=*/false);
  // Then both are EFAULT naming the unmapped part
  EXPECT_EQ(a.errno_value(), EFAULT) << a.ToString();
  EXPECT_NE(a.message().find("not mapped"), std::string::npos) << a.message();
  EXPECT_EQ(b.errno_value(), EFAULT) << b.ToString();
  EXPECT_NE(b.message().find("not mapped"), std::string::npos) << b.message();
}

TEST_P(SnapshotTest, PopulateBadRangeIsEinvalAndMissingFeatureIsEnotsup) {
  Mapping m = SmallAnon(2);
  // Given an unaligned start and an empty range, then EINVAL
  EXPECT_EQ(as_->Populate(m.addr() + 1, m.end(), false).errno_value(), EINVAL);
  EXPECT_EQ(as_->Populate(m.addr(), m.addr(), false).errno_value(), EINVAL);
  // Given a kernel without MADV_POPULATE, then ENOTSUP naming it
  KernelFeatures old = features_;
  old.madv_populate = false;
  auto as = Make({.features = &old});
  ASSERT_NE(as, nullptr);
  Status st = as->Populate(m.addr(), m.end(), true);
  EXPECT_EQ(st.errno_value(), ENOTSUP);
  EXPECT_NE(st.message().find("MADV_POPULATE"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("5.14"), std::string::npos) << st.message();
}

// ---- Retries -------------------------------------------------------------------------------

TEST_P(SnapshotTest, PopulateRetriesEintrAndEagain) {
  for (int error : {EINTR, EAGAIN}) {
    SCOPED_TRACE(strerror(error));
    // Given a Sys whose first madvise fails with EINTR (then EAGAIN)
    test::FlakySys sys;
    sys.error = error;
    sys.fail_madvise = 1;
    auto as = Make({.sys = &sys});
    ASSERT_NE(as, nullptr);
    Mapping m = SmallAnon(2);
    // When the range is populated
    Status st = as->Populate(m.addr(), m.end(), /*write=*/true);
    // Then madvise ran twice, once for the whole range, and the pages are present
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(sys.madvise_calls.load(), 2);
    EXPECT_TRUE(Snap(m)[1].present());
  }
}

TEST_P(SnapshotTest, SnapshotRetriesInterruptedReads) {
  // Given a Sys whose first pread and first ioctl fail with EINTR, and a check that reads bit 56
  test::FlakySys sys;
  sys.fail_pread = 1;
  sys.fail_ioctl = 1;
  auto as = Make({.sys = &sys, .exclusive = ExclusiveCheck::kAlways});
  ASSERT_NE(as, nullptr);
  Mapping m = SmallAnon(4);
  Touch(m, 0);
  Touch(m, 3);
  // When the range is snapshotted
  auto pages = Snap(m.addr(), m.end(), as.get());
  // Then the reads were retried and the result is right
  EXPECT_EQ(pages[0].flags, PageState::kPresent | PageState::kExclusive) << Describe(pages[0]);
  EXPECT_EQ(pages[1].flags, 0);
  EXPECT_EQ(pages[3].flags, PageState::kPresent | PageState::kExclusive) << Describe(pages[3]);
  // One pagemap pread per range (plus the retry); the kernel path adds one PAGEMAP_SCAN and one
  // PROCMAP_QUERY (plus the retry)
  EXPECT_EQ(sys.pread_calls.load(), 2);
  if (features_.pagemap_scan) {
    EXPECT_EQ(sys.ioctl_calls.load(), features_.procmap_query ? 3 : 2);
  }
}

TEST_P(SnapshotTest, LargeRangeIsReadInFewCalls) {
  // Given a 64 MiB mapping with every other page written (32 Ki alternating regions)
  Mapping m(64 * kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  ASSERT_EQ(madvise(m.data(), m.size(), MADV_NOHUGEPAGE), 0);
  const size_t n = m.size() / PageSize();
  for (size_t i = 0; i < n; i += 2) Touch(m, i);
  test::FlakySys sys;
  auto as = Make({.sys = &sys, .exclusive = ExclusiveCheck::kAlways});
  ASSERT_NE(as, nullptr);
  // When it is snapshotted
  auto pages = Snap(m.addr(), m.end(), as.get());
  // Then every page is right
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(pages[i].present(), i % 2 == 0) << i;
    ASSERT_EQ(pages[i].has(PageState::kExclusive), i % 2 == 0) << i;
  }
  // And the kernel was asked in batches, not per page
  EXPECT_LE(sys.pread_calls.load(), 2);  // 16 Ki entries: one pread (plus a THP kpageflags none)
  if (features_.pagemap_scan) {
    EXPECT_LE(sys.ioctl_calls.load(), int(n / 1024) + 2);
  }
}

INSTANTIATE_TEST_SUITE_P(Snapshot, SnapshotTest,
                         ::testing::Values(Mechanism::kKernel, Mechanism::kFallback),
                         MechanismName);

}  // namespace
}  // namespace hmmkit
