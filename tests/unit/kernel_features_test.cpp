// KernelFeatures: the probe agrees with itself, honours HMMKIT_DISABLE, and every answer is
// cross-checked against the system call it stands for, whichever way the running kernel answers.
#include "hmmkit/mirror/kernel_features.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/mirror/uapi.hpp"
#include "test_support.hpp"

namespace hmmkit {
namespace {

using test::Mapping;
using test::PageSize;
using test::ScopedEnv;

// A probe of the real kernel with nothing forced off, whatever the environment of the test run.
KernelFeatures ProbeUnforced() {
  ScopedEnv clear("HMMKIT_DISABLE", nullptr);
  return KernelFeatures::Probe();
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

uint64_t PagemapEntry(const void* addr) {
  Fd pagemap(open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  EXPECT_GE(pagemap.get(), 0) << strerror(errno);
  uint64_t entry = 0;
  off_t off = off_t(reinterpret_cast<uintptr_t>(addr) / PageSize() * sizeof(entry));
  EXPECT_EQ(pread(pagemap.get(), &entry, sizeof(entry), off), ssize_t(sizeof(entry)))
      << strerror(errno);
  return entry;
}

// Opens a userfaultfd the way `mode` names; -1 with errno on failure.
int OpenUffd(UffdOpenMode mode) {
  switch (mode) {
    case UffdOpenMode::kDevNode: {
      Fd dev(open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
      if (dev.get() < 0) return -1;
      return ioctl(dev.get(), USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    }
    case UffdOpenMode::kSyscall:
      return int(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    case UffdOpenMode::kSyscallUserOnly:
      return int(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
    case UffdOpenMode::kNone:
      break;
  }
  errno = EINVAL;
  return -1;
}

const MechanismChoice* FindRow(const std::vector<MechanismChoice>& rows, const std::string& name) {
  for (const MechanismChoice& r : rows)
    if (r.feature == name) return &r;
  return nullptr;
}

// ---- the probe itself
// -----------------------------------------------------------------------------

TEST(KernelFeaturesTest, ProbeTwiceAgrees) {
  KernelFeatures a = ProbeUnforced();
  KernelFeatures b = ProbeUnforced();
  EXPECT_EQ(a.kernel_release, b.kernel_release);
  EXPECT_FALSE(a.kernel_release.empty());
  EXPECT_EQ(a.page_size, PageSize());
  EXPECT_EQ(a.uffd_mode, b.uffd_mode);
  EXPECT_EQ(a.uffd_error, b.uffd_error);
  EXPECT_EQ(a.uffd_features, b.uffd_features);
  EXPECT_EQ(a.uffd_ioctls, b.uffd_ioctls);
  EXPECT_EQ(a.uffd_wp, b.uffd_wp);
  EXPECT_EQ(a.uffd_wp_shmem, b.uffd_wp_shmem);
  EXPECT_EQ(a.uffdio_move, b.uffdio_move);
  EXPECT_EQ(a.uffd_poison, b.uffd_poison);
  EXPECT_EQ(a.pagemap_scan, b.pagemap_scan);
  EXPECT_EQ(a.procmap_query, b.procmap_query);
  EXPECT_EQ(a.pagemap_pfns, b.pagemap_pfns);
  EXPECT_EQ(a.kpageflags, b.kpageflags);
  EXPECT_EQ(a.zero_pfn, b.zero_pfn);
  EXPECT_EQ(a.madv_populate, b.madv_populate);
  EXPECT_EQ(a.madv_collapse, b.madv_collapse);
  EXPECT_EQ(a.thp, b.thp);
  EXPECT_EQ(a.thp_shmem, b.thp_shmem);
  EXPECT_EQ(a.hugetlb_page_size, b.hugetlb_page_size);
  EXPECT_EQ(a.hugetlb_total, b.hugetlb_total);  // not _free: another process may take pages
  EXPECT_TRUE(a.disabled.empty());
}

TEST(KernelFeaturesTest, GetIsOneObjectForAllThreads) {
  const KernelFeatures* first = &KernelFeatures::Get();
  std::atomic<int> same{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      if (&KernelFeatures::Get() == first) same.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(same.load(), 4);
  EXPECT_EQ(first->uffd_mode, KernelFeatures::Probe().uffd_mode);
}

TEST(KernelFeaturesTest, ProbeDoesNotLog) {
  ScopedEnv env("HMMKIT_DISABLE", "no_such_feature,pagemap_scan");
  ScopedEnv log("HMMKIT_LOG", "trace");
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  KernelFeatures f = KernelFeatures::Probe();
  std::string out = testing::internal::GetCapturedStdout();
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(out, "");
  EXPECT_EQ(err, "");
  EXPECT_EQ(f.disabled, std::set<std::string>{"pagemap_scan"});
}

// ---- HMMKIT_DISABLE
// -------------------------------------------------------------------------------

TEST(KernelFeaturesTest, DisableForcesFallbacksAndListsThem) {
  // Given HMMKIT_DISABLE naming the two /proc ioctls,
  ScopedEnv env("HMMKIT_DISABLE", "pagemap_scan,procmap_query");
  // when probing,
  KernelFeatures f = KernelFeatures::Probe();
  // then both are off, listed, and nothing else is.
  EXPECT_FALSE(f.pagemap_scan);
  EXPECT_FALSE(f.procmap_query);
  EXPECT_EQ(f.disabled, (std::set<std::string>{"pagemap_scan", "procmap_query"}));
  KernelFeatures base = ProbeUnforced();
  EXPECT_EQ(f.madv_populate, base.madv_populate);
  EXPECT_EQ(f.uffd_mode, base.uffd_mode);
  EXPECT_EQ(f.uffd_features, base.uffd_features);
  // and the mechanism table names the forcing.
  auto rows = ChooseMechanisms(f);
  const MechanismChoice* snap = FindRow(rows, "page snapshot");
  ASSERT_NE(snap, nullptr);
  EXPECT_TRUE(snap->degraded);
  EXPECT_NE(snap->note.find("HMMKIT_DISABLE"), std::string::npos) << snap->note;
}

TEST(KernelFeaturesTest, DisableEveryKnownName) {
  ScopedEnv env("HMMKIT_DISABLE",
                "pagemap_scan,procmap_query,madv_populate,uffdio_move,uffd_wp,dev_userfaultfd");
  KernelFeatures f = KernelFeatures::Probe();
  EXPECT_EQ(f.disabled.size(), 6u);
  EXPECT_FALSE(f.pagemap_scan);
  EXPECT_FALSE(f.procmap_query);
  EXPECT_FALSE(f.madv_populate);
  EXPECT_FALSE(f.uffdio_move);
  EXPECT_FALSE(f.uffd_wp);
  EXPECT_FALSE(f.uffd_wp_shmem);
  EXPECT_NE(f.uffd_mode, UffdOpenMode::kDevNode);
  // The bits go too, so has_uffd_feature() and the bools agree.
  EXPECT_FALSE(f.has_uffd_feature(UFFD_FEATURE_MOVE));
  EXPECT_FALSE(f.has_uffd_feature(UFFD_FEATURE_PAGEFAULT_FLAG_WP));
  EXPECT_FALSE(f.has_uffd_feature(UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
}

TEST(KernelFeaturesTest, DisableIgnoresUnknownNamesAndBlanks) {
  ScopedEnv env("HMMKIT_DISABLE", " uffd_wp ,bogus,,PAGEMAP_SCAN, procmap_query");
  KernelFeatures f = KernelFeatures::Probe();
  EXPECT_EQ(f.disabled, (std::set<std::string>{"uffd_wp", "procmap_query"}));
  EXPECT_EQ(f.pagemap_scan, ProbeUnforced().pagemap_scan);  // names are case-sensitive
}

TEST(KernelFeaturesTest, DisableDevUserfaultfdFallsBackToTheSyscall) {
  KernelFeatures base = ProbeUnforced();
  ScopedEnv env("HMMKIT_DISABLE", "dev_userfaultfd");
  KernelFeatures f = KernelFeatures::Probe();
  EXPECT_EQ(f.disabled, std::set<std::string>{"dev_userfaultfd"});
  EXPECT_NE(f.uffd_mode, UffdOpenMode::kDevNode);
  EXPECT_NE(f.uffd_error.find("/dev/userfaultfd"), std::string::npos) << f.uffd_error;
  if (f.uffd_mode != UffdOpenMode::kNone) {
    // The same kernel answers the handshake the same way whichever way the fd was opened.
    EXPECT_EQ(f.uffd_features, base.uffd_features);
  }
}

// ---- each answer against the system call
// -----------------------------------------------------------

TEST(KernelFeaturesTest, PagemapScanAgreesWithTheIoctl) {
  KernelFeatures f = ProbeUnforced();
  // Given two pages, the first one written,
  Mapping m(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  m.data()[0] = 1;
  Fd pagemap(open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  ASSERT_GE(pagemap.get(), 0) << strerror(errno);
  page_region regions[4] = {};
  pm_scan_arg arg{};
  arg.size = sizeof(arg);
  arg.start = m.addr();
  arg.end = m.end();
  arg.vec = reinterpret_cast<uintptr_t>(regions);
  arg.vec_len = 4;
  arg.return_mask = PAGE_IS_PRESENT;
  // when scanning them directly,
  int n = ioctl(pagemap.get(), PAGEMAP_SCAN, &arg);
  // then the call works exactly when the probe says so, and reports the first page alone present.
  if (f.pagemap_scan) {
    ASSERT_GE(n, 1) << strerror(errno);
    EXPECT_EQ(regions[0].start, m.addr());
    EXPECT_EQ(regions[0].end, m.addr() + PageSize());
    EXPECT_EQ(regions[0].categories, uint64_t(PAGE_IS_PRESENT));
  } else {
    EXPECT_EQ(n, -1);
    EXPECT_TRUE(errno == ENOTTY || errno == EINVAL) << strerror(errno);
  }
}

TEST(KernelFeaturesTest, ProcmapQueryAgreesWithTheIoctl) {
  KernelFeatures f = ProbeUnforced();
  // Given a one-page read-only VMA between two PROT_NONE pages (so it merges with nothing),
  Mapping m(3 * PageSize(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_EQ(mprotect(m.page(1), PageSize(), PROT_READ), 0) << strerror(errno);
  Fd maps(open("/proc/self/maps", O_RDONLY | O_CLOEXEC));
  ASSERT_GE(maps.get(), 0) << strerror(errno);
  procmap_query q{};
  q.size = sizeof(q);
  q.query_addr = reinterpret_cast<uintptr_t>(m.page(1)) + 8;
  // when querying it directly,
  int r = ioctl(maps.get(), PROCMAP_QUERY, &q);
  // then the call works exactly when the probe says so, and finds exactly that VMA.
  if (f.procmap_query) {
    ASSERT_EQ(r, 0) << strerror(errno);
    EXPECT_EQ(q.vma_start, reinterpret_cast<uintptr_t>(m.page(1)));
    EXPECT_EQ(q.vma_end, reinterpret_cast<uintptr_t>(m.page(2)));
    EXPECT_TRUE(q.vma_flags & PROCMAP_QUERY_VMA_READABLE);
    EXPECT_FALSE(q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE);
  } else {
    EXPECT_EQ(r, -1);
    EXPECT_EQ(errno, ENOTTY) << strerror(errno);
  }
}

TEST(KernelFeaturesTest, MadvPopulateAgreesWithMadvise) {
  KernelFeatures f = ProbeUnforced();
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  int r = madvise(m.data(), PageSize(), MADV_POPULATE_WRITE);
  if (f.madv_populate) {
    ASSERT_EQ(r, 0) << strerror(errno);
    EXPECT_TRUE(PagemapEntry(m.data()) & pagemap_bits::kPresent);
  } else {
    EXPECT_EQ(r, -1);
    EXPECT_EQ(errno, EINVAL) << strerror(errno);
  }
}

// The errnos docs/kernel-features.md states: madvise answers EINVAL for both a read-only VMA
// (POPULATE_WRITE) and a PROT_NONE VMA, and ENOMEM for a hole; range_fault tells them apart by the
// VMA's protection (EPERM, EFAULT, EFAULT).
TEST(KernelFeaturesTest, PopulateErrnosAsDocumented) {
  if (!ProbeUnforced().madv_populate) GTEST_SKIP() << "no MADV_POPULATE";
  Mapping ro(PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_EQ(madvise(ro.data(), PageSize(), MADV_POPULATE_READ), 0) << strerror(errno);
  EXPECT_EQ(madvise(ro.data(), PageSize(), MADV_POPULATE_WRITE), -1);
  EXPECT_EQ(errno, EINVAL);
  Mapping none(PageSize(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_EQ(madvise(none.data(), PageSize(), MADV_POPULATE_READ), -1);
  EXPECT_EQ(errno, EINVAL);
  Mapping hole(2 * PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_EQ(hole.UnmapPart(hole.page(1), PageSize()), 0);
  EXPECT_EQ(madvise(hole.data(), 2 * PageSize(), MADV_POPULATE_READ), -1);
  EXPECT_EQ(errno, ENOMEM);
  munmap(hole.data(), PageSize());
  hole.Release();
}

TEST(KernelFeaturesTest, UffdOpensTheReportedWay) {
  KernelFeatures f = ProbeUnforced();
  if (f.uffd_mode == UffdOpenMode::kNone) {
    // None of the ways works, and the report says why.
    for (auto mode :
         {UffdOpenMode::kDevNode, UffdOpenMode::kSyscall, UffdOpenMode::kSyscallUserOnly}) {
      Fd fd(OpenUffd(mode));
      EXPECT_LT(fd.get(), 0) << ToString(mode);
    }
    EXPECT_FALSE(f.uffd_error.empty());
    EXPECT_EQ(f.uffd_features, 0u);
    return;
  }
  // Given the reported open mode, an fd opens that way,
  Fd fd(OpenUffd(f.uffd_mode));
  ASSERT_GE(fd.get(), 0) << ToString(f.uffd_mode) << ": " << strerror(errno);
  // and its handshake offers exactly the reported features.
  uffdio_api api{};
  api.api = UFFD_API;
  ASSERT_EQ(ioctl(fd.get(), UFFDIO_API, &api), 0) << strerror(errno);
  EXPECT_EQ(api.features, f.uffd_features);
  EXPECT_EQ(api.ioctls, f.uffd_ioctls);
  EXPECT_TRUE(f.uffd_ioctls & (uint64_t(1) << _UFFDIO_REGISTER));
  if (f.uffd_mode == UffdOpenMode::kSyscallUserOnly) {
    // A better way was refused, and the report says why.
    Fd full(OpenUffd(UffdOpenMode::kSyscall));
    EXPECT_LT(full.get(), 0);
    EXPECT_NE(f.uffd_error.find("userfaultfd(2)"), std::string::npos) << f.uffd_error;
  }
  if (f.uffd_mode == UffdOpenMode::kDevNode) {
    EXPECT_TRUE(f.uffd_error.empty()) << f.uffd_error;
  }
}

TEST(KernelFeaturesTest, UffdBoolsFollowFeatureBits) {
  KernelFeatures f = ProbeUnforced();
  EXPECT_EQ(f.uffd_wp, f.has_uffd_feature(UFFD_FEATURE_PAGEFAULT_FLAG_WP));
  EXPECT_EQ(f.uffd_wp_shmem, f.has_uffd_feature(UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
  EXPECT_EQ(f.uffdio_move, f.has_uffd_feature(UFFD_FEATURE_MOVE));
  EXPECT_EQ(f.uffd_poison, f.has_uffd_feature(UFFD_FEATURE_POISON));
}

TEST(KernelFeaturesTest, ZeroPfnIsWhatAFreshReadFaultMaps) {
  KernelFeatures f = ProbeUnforced();
  if (!f.pagemap_pfns) {
    EXPECT_EQ(f.zero_pfn, 0u);
    GTEST_SKIP() << "PFNs hidden (no CAP_SYS_ADMIN)";
  }
  // Given a fresh mapping (no THP: the huge zero page has another PFN),
  Mapping m(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_EQ(madvise(m.data(), m.size(), MADV_NOHUGEPAGE), 0) << strerror(errno);
  // when page 0 is read and page 1 written,
  volatile char* p = m.data();
  (void)p[0];
  p[PageSize()] = 1;
  // then page 0 maps the zero page and page 1 does not.
  uint64_t read_entry = PagemapEntry(m.page(0));
  uint64_t written_entry = PagemapEntry(m.page(1));
  ASSERT_TRUE(read_entry & pagemap_bits::kPresent);
  ASSERT_TRUE(written_entry & pagemap_bits::kPresent);
  EXPECT_NE(f.zero_pfn, 0u);
  EXPECT_EQ(read_entry & pagemap_bits::kPfnMask, f.zero_pfn);
  EXPECT_NE(written_entry & pagemap_bits::kPfnMask, f.zero_pfn);
  EXPECT_NE(written_entry & pagemap_bits::kPfnMask, 0u);
}

TEST(KernelFeaturesTest, KpageflagsAgreesWithRead) {
  KernelFeatures f = ProbeUnforced();
  Fd fd(open("/proc/kpageflags", O_RDONLY | O_CLOEXEC));
  uint64_t flags = 0;
  bool readable = fd.get() >= 0 && pread(fd.get(), &flags, sizeof(flags), 0) == 8;
  EXPECT_EQ(f.kpageflags, readable);
}

TEST(KernelFeaturesTest, ThpMatchesSysfs) {
  KernelFeatures f = ProbeUnforced();
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  if (!in || !std::getline(in, line)) {
    EXPECT_EQ(f.thp, ThpMode::kUnavailable);
    return;
  }
  EXPECT_NE(f.thp, ThpMode::kUnavailable);
  EXPECT_NE(line.find(std::string("[") + ToString(f.thp) + "]"), std::string::npos) << line;
  std::ifstream shmem("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  if (shmem && std::getline(shmem, line)) {
    EXPECT_NE(line.find("[" + f.thp_shmem + "]"), std::string::npos) << line;
  }
}

TEST(KernelFeaturesTest, HugetlbMatchesMeminfo) {
  KernelFeatures f = ProbeUnforced();
  std::ifstream in("/proc/meminfo");
  long value = 0;
  std::string line;
  long size_kb = 0, total = -1;
  while (std::getline(in, line)) {
    if (sscanf(line.c_str(), "Hugepagesize: %ld kB", &value) == 1) size_kb = value;
    if (sscanf(line.c_str(), "HugePages_Total: %ld", &value) == 1) total = value;
  }
  EXPECT_EQ(f.hugetlb_page_size, size_t(size_kb) * 1024);
  if (total >= 0) {
    EXPECT_EQ(f.hugetlb_total, total);
  }
}

// ---- mechanism table and names
// --------------------------------------------------------------------

TEST(KernelFeaturesTest, MechanismsFollowTheFeatures) {
  KernelFeatures real = ProbeUnforced();
  for (bool on : {true, false}) {
    KernelFeatures f = real;
    f.pagemap_scan = on;
    f.procmap_query = on;
    f.madv_populate = on;
    f.uffd_mode = on ? UffdOpenMode::kSyscall : UffdOpenMode::kNone;
    f.uffd_error = on ? "" : "userfaultfd(2): EPERM";
    auto rows = ChooseMechanisms(f);
    for (const char* name :
         {"userfaultfd", "VMA lookup", "page snapshot", "CPU fault (range_fault)",
          "unmap/remove/remap events", "write protection during migration", "device-exclusive",
          "memory-failure poison", "mprotect notifications", "THP", "hugetlb"}) {
      const MechanismChoice* r = FindRow(rows, name);
      ASSERT_NE(r, nullptr) << name;
      EXPECT_FALSE(r->mechanism.empty()) << name;
    }
    EXPECT_EQ(FindRow(rows, "page snapshot")->degraded, !on);
    EXPECT_EQ(FindRow(rows, "VMA lookup")->degraded, !on);
    EXPECT_EQ(FindRow(rows, "CPU fault (range_fault)")->degraded, !on);
    EXPECT_EQ(FindRow(rows, "userfaultfd")->degraded, !on);
    if (!on) {
      // Without userfaultfd there are no events, and the report says why.
      EXPECT_TRUE(FindRow(rows, "unmap/remove/remap events")->degraded);
      EXPECT_NE(FindRow(rows, "userfaultfd")->note.find("EPERM"), std::string::npos);
      EXPECT_NE(FindRow(rows, "CPU fault (range_fault)")->note.find("ENOTSUP"), std::string::npos);
    }
  }
  // The real probe: "page snapshot" is degraded exactly when PAGEMAP_SCAN is missing.
  auto rows = ChooseMechanisms(real);
  EXPECT_EQ(FindRow(rows, "page snapshot")->degraded, !real.pagemap_scan);
  EXPECT_EQ(FindRow(rows, "VMA lookup")->degraded, !real.procmap_query);
}

TEST(KernelFeaturesTest, DeviceExclusiveFallsBackToWriteProtect) {
  KernelFeatures f;
  f.uffd_mode = UffdOpenMode::kSyscall;
  f.uffd_wp = true;
  f.uffdio_move = false;
  const MechanismChoice* r = nullptr;
  auto rows = ChooseMechanisms(f);
  r = FindRow(rows, "device-exclusive");
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->mechanism, "write-protect");
  EXPECT_TRUE(r->degraded);
  f.uffdio_move = true;
  rows = ChooseMechanisms(f);
  EXPECT_EQ(FindRow(rows, "device-exclusive")->mechanism, "UFFDIO_MOVE");
  EXPECT_FALSE(FindRow(rows, "device-exclusive")->degraded);
}

TEST(KernelFeaturesTest, UffdFeatureNamesAreDistinctAscendingBits) {
  auto names = UffdFeatureNames();
  ASSERT_GE(names.size(), 17u);
  uint64_t prev = 0;
  std::set<std::string> seen;
  for (const auto& [name, bit] : names) {
    EXPECT_EQ(bit & (bit - 1), 0u) << name << " is not a single bit";
    EXPECT_GT(bit, prev) << name;
    EXPECT_TRUE(seen.insert(name).second) << name;
    prev = bit;
  }
  EXPECT_EQ(names.front().second, uint64_t(UFFD_FEATURE_PAGEFAULT_FLAG_WP));
  EXPECT_TRUE(seen.count("MOVE") && seen.count("POISON") && seen.count("EVENT_UNMAP"));
}

TEST(KernelFeaturesTest, ToStringNamesEveryMode) {
  std::set<std::string> uffd;
  for (auto m : {UffdOpenMode::kNone, UffdOpenMode::kDevNode, UffdOpenMode::kSyscall,
                 UffdOpenMode::kSyscallUserOnly})
    uffd.insert(ToString(m));
  EXPECT_EQ(uffd.size(), 4u);
  std::set<std::string> thp;
  for (auto m : {ThpMode::kUnavailable, ThpMode::kAlways, ThpMode::kMadvise, ThpMode::kNever})
    thp.insert(ToString(m));
  EXPECT_EQ(thp.size(), 4u);
  EXPECT_STREQ(ToString(ThpMode::kMadvise), "madvise");
}

}  // namespace
}  // namespace hmmkit
