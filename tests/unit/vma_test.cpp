// AddressSpace::FindVma / FindVmas over real mappings: the VMA fields, the VmaKind classification,
// and the retry of interrupted queries. Every test runs with the mechanisms the kernel offers
// ("kernel") and with the /proc/self/maps fallback forced ("fallback"); ctest also runs the whole
// binary with HMMKIT_DISABLE=pagemap_scan,procmap_query.
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <string>

#include <gtest/gtest.h>

#include "flaky_sys.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "test_support.hpp"

namespace hmmkit {
namespace {

using test::Mapping;
using test::PageSize;

enum class Mechanism { kKernel, kFallback };

std::string MechanismName(const ::testing::TestParamInfo<Mechanism>& info) {
  return info.param == Mechanism::kKernel ? "kernel" : "fallback";
}

bool IsTmpfs(const char* dir) {
  struct statfs sfs;
  return statfs(dir, &sfs) == 0 && sfs.f_type == TMPFS_MAGIC;
}

class VmaTest : public ::testing::TestWithParam<Mechanism> {
 protected:
  void SetUp() override {
    features_ = KernelFeatures::Get();
    if (GetParam() == Mechanism::kFallback) features_.procmap_query = false;
    as_ = Make({});
    ASSERT_NE(as_, nullptr);
  }

  std::shared_ptr<AddressSpace> Make(AddressSpace::Options options) {
    if (!options.features) options.features = &features_;
    options.start_monitor = false;
    return test::MakeAddressSpace(options);
  }

  // The VMA at addr; fails the test when there is none.
  Vma Find(uintptr_t addr) {
    auto vma = as_->FindVma(addr);
    EXPECT_TRUE(vma.ok()) << vma.status().ToString();
    if (!vma.ok() || !vma->has_value()) {
      ADD_FAILURE() << "no VMA at " << std::hex << addr;
      return Vma{};
    }
    return **vma;
  }

  KernelFeatures features_;
  std::shared_ptr<AddressSpace> as_;
};

TEST_P(VmaTest, PrivateAnonymousIsAnonAndMigratable) {
  // Given a private anonymous read-write mapping
  Mapping m(4 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  // When its middle is looked up
  Vma vma = Find(m.addr() + 2 * PageSize());
  // Then the VMA covers it, is anonymous, private, read-write, and both registrable and migratable
  EXPECT_LE(vma.start, m.addr());
  EXPECT_GE(vma.end, m.end());
  EXPECT_TRUE(vma.contains(m.addr() + 2 * PageSize()));
  EXPECT_EQ(vma.kind, VmaKind::kAnon) << ToString(vma.kind);
  EXPECT_TRUE(vma.read);
  EXPECT_TRUE(vma.write);
  EXPECT_FALSE(vma.exec);
  EXPECT_FALSE(vma.shared);
  EXPECT_EQ(vma.inode, 0u);
  EXPECT_EQ(vma.page_size, PageSize());
  EXPECT_TRUE(vma.accessible());
  EXPECT_TRUE(vma.registrable());
  EXPECT_TRUE(vma.migratable());
}

TEST_P(VmaTest, ProtNoneIsNotAccessible) {
  // Given a PROT_NONE mapping
  Mapping m(2 * PageSize(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it exists but is not accessible (hmm_range_fault treats it like no VMA)
  EXPECT_EQ(vma.kind, VmaKind::kAnon);
  EXPECT_FALSE(vma.read || vma.write || vma.exec);
  EXPECT_FALSE(vma.accessible());
}

TEST_P(VmaTest, ReadOnlyMappingIsNotWritable) {
  // Given a read-only anonymous mapping
  Mapping m(2 * PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it is readable, not writable
  EXPECT_TRUE(vma.read);
  EXPECT_FALSE(vma.write);
  EXPECT_TRUE(vma.accessible());
}

TEST_P(VmaTest, SharedAnonymousIsShmemNotMigratable) {
  // Given a MAP_SHARED|MAP_ANONYMOUS mapping
  Mapping m(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it is shmem: registrable with userfaultfd, never migrated
  EXPECT_EQ(vma.kind, VmaKind::kShmem) << ToString(vma.kind) << " " << vma.name;
  EXPECT_TRUE(vma.shared);
  EXPECT_NE(vma.inode, 0u);
  EXPECT_TRUE(vma.registrable());
  EXPECT_FALSE(vma.migratable());
}

TEST_P(VmaTest, MemfdIsShmem) {
  // Given a shared mapping of a memfd
  Mapping m = Mapping::Memfd(2 * PageSize());
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it is shmem, named after the memfd
  EXPECT_EQ(vma.kind, VmaKind::kShmem) << ToString(vma.kind) << " " << vma.name;
  EXPECT_TRUE(vma.shared);
  EXPECT_EQ(vma.name.rfind("/memfd:hmmkit-test", 0), 0u) << vma.name;
  EXPECT_FALSE(vma.migratable());
}

TEST_P(VmaTest, TmpfsFileIsShmem) {
  if (!IsTmpfs("/dev/shm")) GTEST_SKIP() << "/dev/shm is not tmpfs";
  // Given a shared mapping of an unlinked file on tmpfs
  Mapping m = Mapping::TmpFile(2 * PageSize(), "/dev/shm");
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it is shmem (by the device's filesystem, not by its name)
  EXPECT_EQ(vma.kind, VmaKind::kShmem) << ToString(vma.kind) << " " << vma.name;
  EXPECT_EQ(vma.name.rfind("/dev/shm/", 0), 0u) << vma.name;
  EXPECT_TRUE(vma.registrable());
}

TEST_P(VmaTest, PrivateMappingOfTmpfsFileIsShmemNotShared) {
  if (!IsTmpfs("/dev/shm")) GTEST_SKIP() << "/dev/shm is not tmpfs";
  // Given a private mapping of a tmpfs file
  Mapping m = Mapping::TmpFile(2 * PageSize(), "/dev/shm", MAP_PRIVATE);
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it is shmem, private, and not migratable (only anonymous memory is)
  EXPECT_EQ(vma.kind, VmaKind::kShmem) << ToString(vma.kind);
  EXPECT_FALSE(vma.shared);
  EXPECT_FALSE(vma.migratable());
}

TEST_P(VmaTest, FileOnDiskIsFile) {
  if (IsTmpfs("/tmp")) GTEST_SKIP() << "/tmp is tmpfs";
  // Given a shared mapping of an unlinked file on a disk filesystem
  Mapping m = Mapping::TmpFile(2 * PageSize(), "/tmp");
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it is a regular file: neither registrable nor migratable
  EXPECT_EQ(vma.kind, VmaKind::kFile) << ToString(vma.kind) << " " << vma.name;
  EXPECT_TRUE(vma.shared);
  EXPECT_FALSE(vma.registrable());
  EXPECT_FALSE(vma.migratable());
}

TEST_P(VmaTest, ExecutableTextIsFile) {
  // Given the code of this test binary
  char exe[PATH_MAX] = {};
  ASSERT_GT(readlink("/proc/self/exe", exe, sizeof exe - 1), 0);
  auto code = reinterpret_cast<uintptr_t>(&MechanismName);
  // When the VMA holding it is looked up
  Vma vma = Find(code);
  // Then it is an executable, private file mapping of the binary
  EXPECT_EQ(vma.name, exe);
  EXPECT_TRUE(vma.exec);
  EXPECT_FALSE(vma.shared);
  EXPECT_NE(vma.inode, 0u);
  if (!IsTmpfs(exe)) {
    EXPECT_EQ(vma.kind, VmaKind::kFile) << ToString(vma.kind);
  }
  EXPECT_FALSE(vma.migratable());
}

TEST_P(VmaTest, VdsoIsSpecial) {
  // Given the vDSO
  uintptr_t vdso = getauxval(AT_SYSINFO_EHDR);
  if (vdso == 0) GTEST_SKIP() << "no vDSO";
  // When it is looked up
  Vma vma = Find(vdso);
  // Then it is a special mapping that is never mirrored
  EXPECT_EQ(vma.name, "[vdso]");
  EXPECT_EQ(vma.kind, VmaKind::kSpecial) << ToString(vma.kind);
  EXPECT_FALSE(vma.registrable());
  EXPECT_FALSE(vma.migratable());
}

TEST_P(VmaTest, StackIsAnon) {
  // Given a local variable on the main thread's stack (GoogleTest runs tests on it)
  int local = 0;
  // When its VMA is looked up
  Vma vma = Find(reinterpret_cast<uintptr_t>(&local));
  // Then it is the [stack], private anonymous memory
  EXPECT_EQ(vma.name, "[stack]");
  EXPECT_EQ(vma.kind, VmaKind::kAnon) << ToString(vma.kind);
}

TEST_P(VmaTest, DevZeroPrivateIsAnonSharedIsShmem) {
  int fd = open("/dev/zero", O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0) << strerror(errno);
  // Given a private and a shared mapping of /dev/zero
  Mapping priv(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd);
  Mapping shared(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED, fd);
  close(fd);
  // When they are looked up
  Vma p = Find(priv.addr());
  Vma s = Find(shared.addr());
  // Then the private one is anonymous memory and the shared one shmem
  EXPECT_EQ(p.kind, VmaKind::kAnon) << ToString(p.kind) << " " << p.name;
  EXPECT_TRUE(p.migratable());
  EXPECT_EQ(s.kind, VmaKind::kShmem) << ToString(s.kind) << " " << s.name;
}

TEST_P(VmaTest, HugetlbMappingIsHugetlb) {
  const KernelFeatures& f = as_->features();
  if (f.hugetlb_page_size == 0 || f.hugetlb_free == 0) GTEST_SKIP() << "no free hugetlb pages";
  // Given a MAP_HUGETLB mapping of one default-size huge page
  Mapping m(f.hugetlb_page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB);
  ASSERT_NE(m.data(), nullptr);
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it is hugetlb with the huge page size, registrable, not migratable
  EXPECT_EQ(vma.kind, VmaKind::kHugetlb) << ToString(vma.kind) << " " << vma.name;
  EXPECT_EQ(vma.page_size, f.hugetlb_page_size);
  EXPECT_TRUE(vma.registrable());
  EXPECT_FALSE(vma.migratable());
}

TEST_P(VmaTest, HugetlbMemfdIsHugetlb) {
  const KernelFeatures& f = as_->features();
  if (f.hugetlb_page_size == 0 || f.hugetlb_free == 0) GTEST_SKIP() << "no free hugetlb pages";
  // Given a shared mapping of a MFD_HUGETLB memfd (named like a shmem memfd)
  int fd = memfd_create("hmmkit-huge", MFD_CLOEXEC | MFD_HUGETLB);
  ASSERT_GE(fd, 0) << strerror(errno);
  ASSERT_EQ(ftruncate(fd, off_t(f.hugetlb_page_size)), 0) << strerror(errno);
  Mapping m(f.hugetlb_page_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
  close(fd);
  ASSERT_NE(m.data(), nullptr);
  // When it is looked up
  Vma vma = Find(m.addr());
  // Then it is hugetlb (by its device), not shmem, with the huge page size
  EXPECT_EQ(vma.kind, VmaKind::kHugetlb) << ToString(vma.kind) << " " << vma.name;
  EXPECT_EQ(vma.page_size, f.hugetlb_page_size);
  EXPECT_TRUE(vma.shared);
}

TEST_P(VmaTest, UnmappedAddressHasNoVma) {
  // Given three pages whose middle one is unmapped
  Mapping m(3 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_EQ(m.UnmapPart(m.page(1), PageSize()), 0);
  // When the hole, and address 0, are looked up
  auto hole = as_->FindVma(m.addr() + PageSize());
  auto zero = as_->FindVma(0);
  // Then there is no VMA
  ASSERT_TRUE(hole.ok()) << hole.status().ToString();
  EXPECT_FALSE(hole->has_value()) << std::hex << (*hole)->start << "-" << (*hole)->end;
  ASSERT_TRUE(zero.ok());
  EXPECT_FALSE(zero->has_value());
}

TEST_P(VmaTest, FindVmasSkipsTheHoleInAddressOrder) {
  // Given three pages with different protections whose middle one is unmapped
  Mapping m(3 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_EQ(mprotect(m.page(2), PageSize(), PROT_READ), 0);
  ASSERT_EQ(m.UnmapPart(m.page(1), PageSize()), 0);
  // When the VMAs over the whole range are listed
  auto vmas = as_->FindVmas(m.addr(), m.end());
  // Then they are the two mapped pieces, in order, not clipped, and the hole is absent
  ASSERT_TRUE(vmas.ok()) << vmas.status().ToString();
  ASSERT_EQ(vmas->size(), 2u);
  const Vma& lo = (*vmas)[0];
  const Vma& hi = (*vmas)[1];
  EXPECT_TRUE(lo.contains(m.addr()));
  EXPECT_EQ(lo.end, m.addr() + PageSize());
  EXPECT_TRUE(lo.write);
  EXPECT_EQ(hi.start, m.addr() + 2 * PageSize());
  EXPECT_FALSE(hi.write);
  EXPECT_LT(lo.end, hi.start);
}

TEST_P(VmaTest, FindVmasOfAHoleIsEmpty) {
  // Given an unmapped range
  Mapping m(2 * PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  uintptr_t start = m.addr();
  m.Unmap();
  // When its VMAs are listed
  auto vmas = as_->FindVmas(start, start + 2 * PageSize());
  // Then there are none (no error)
  ASSERT_TRUE(vmas.ok()) << vmas.status().ToString();
  EXPECT_TRUE(vmas->empty());
}

TEST_P(VmaTest, FindVmasOverTheWholeAddressSpaceIsSortedAndDisjoint) {
  // Given the whole process
  // When every VMA is listed
  auto vmas = as_->FindVmas(0, UINTPTR_MAX);
  // Then there are several, sorted, disjoint, and among them the stack
  ASSERT_TRUE(vmas.ok()) << vmas.status().ToString();
  ASSERT_GT(vmas->size(), 5u);
  bool stack = false;
  for (size_t i = 0; i < vmas->size(); ++i) {
    const Vma& v = (*vmas)[i];
    EXPECT_LT(v.start, v.end);
    if (i > 0) {
      EXPECT_LE((*vmas)[i - 1].end, v.start);
    }
    stack |= v.name == "[stack]";
  }
  EXPECT_TRUE(stack);
}

TEST_P(VmaTest, BothMechanismsAgree) {
  // Given mappings of every kind, and an AddressSpace that uses the other VMA mechanism
  Mapping anon(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  Mapping shared(2 * PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  Mapping memfd = Mapping::Memfd(2 * PageSize());
  Mapping none(PageSize(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  KernelFeatures other = features_;
  other.procmap_query = !features_.procmap_query && KernelFeatures::Get().procmap_query;
  AddressSpace::Options options;
  options.features = &other;
  options.start_monitor = false;
  auto as2 = test::MakeAddressSpace(options);
  ASSERT_NE(as2, nullptr);
  int local = 0;
  uintptr_t addrs[] = {anon.addr(),
                       shared.addr(),
                       memfd.addr(),
                       none.addr(),
                       reinterpret_cast<uintptr_t>(&MechanismName),
                       reinterpret_cast<uintptr_t>(&local),
                       getauxval(AT_SYSINFO_EHDR)};
  for (uintptr_t a : addrs) {
    if (a == 0) continue;
    // When both look the address up
    auto x = as_->FindVma(a);
    auto y = as2->FindVma(a);
    // Then they report the same VMA
    ASSERT_TRUE(x.ok() && y.ok());
    ASSERT_TRUE(x->has_value() && y->has_value()) << std::hex << a;
    const Vma& p = **x;
    const Vma& q = **y;
    SCOPED_TRACE(p.name);
    EXPECT_EQ(p.start, q.start);
    EXPECT_EQ(p.end, q.end);
    EXPECT_EQ(p.read, q.read);
    EXPECT_EQ(p.write, q.write);
    EXPECT_EQ(p.exec, q.exec);
    EXPECT_EQ(p.shared, q.shared);
    EXPECT_EQ(p.kind, q.kind);
    EXPECT_EQ(p.page_size, q.page_size);
    EXPECT_EQ(p.offset, q.offset);
    EXPECT_EQ(p.inode, q.inode);
    EXPECT_EQ(p.dev_major, q.dev_major);
    EXPECT_EQ(p.dev_minor, q.dev_minor);
    EXPECT_EQ(p.name, q.name);
  }
}

TEST_P(VmaTest, InterruptedQueryIsRetried) {
  // Given a Sys whose first ioctl and first read fail with EINTR
  test::FlakySys sys;
  sys.fail_ioctl = 1;
  sys.fail_read = 1;
  AddressSpace::Options options;
  options.sys = &sys;
  auto as = Make(options);
  ASSERT_NE(as, nullptr);
  Mapping m(PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  // When a VMA is looked up
  auto vma = as->FindVma(m.addr());
  // Then the query was retried and succeeded
  ASSERT_TRUE(vma.ok()) << vma.status().ToString();
  ASSERT_TRUE(vma->has_value());
  EXPECT_TRUE((*vma)->contains(m.addr()));
  if (features_.procmap_query) {
    EXPECT_EQ(sys.ioctl_calls.load(), 2);
  } else {
    EXPECT_GE(sys.read_calls.load(), 2);
  }
}

TEST(VmaKindTest, ToStringNamesEveryKind) {
  // Given every kind, when it is printed, then each has its own name
  EXPECT_STREQ(ToString(VmaKind::kAnon), "anon");
  EXPECT_STREQ(ToString(VmaKind::kShmem), "shmem");
  EXPECT_STREQ(ToString(VmaKind::kFile), "file");
  EXPECT_STREQ(ToString(VmaKind::kHugetlb), "hugetlb");
  EXPECT_STREQ(ToString(VmaKind::kSpecial), "special");
}

TEST(VmaKindTest, RegistrableAndMigratablePerKind) {
  // Given a VMA of each kind
  struct Row {
    VmaKind kind;
    bool shared;
    bool registrable;
    bool migratable;
  } rows[] = {
      {VmaKind::kAnon, false, true, true},     {VmaKind::kShmem, true, true, false},
      {VmaKind::kShmem, false, true, false},   {VmaKind::kFile, false, false, false},
      {VmaKind::kHugetlb, false, true, false}, {VmaKind::kSpecial, false, false, false},
  };
  for (const Row& r : rows) {
    Vma v;
    v.kind = r.kind;
    v.shared = r.shared;
    // Then only anon, shmem and hugetlb register with userfaultfd, and only private anon migrates
    EXPECT_EQ(v.registrable(), r.registrable) << ToString(r.kind);
    EXPECT_EQ(v.migratable(), r.migratable) << ToString(r.kind);
  }
}

INSTANTIATE_TEST_SUITE_P(Vma, VmaTest, ::testing::Values(Mechanism::kKernel, Mechanism::kFallback),
                         MechanismName);

}  // namespace
}  // namespace hmmkit

namespace hmmkit {
namespace {

// The helper behind the tests that punch holes: a Mapping's destructor unmaps only what is still
// its own. It used to unmap the whole range, and with it whatever had taken the hole since (a
// parity test crashed in the monitor's event thread: its message slab had landed in the hole).
TEST(PunchedHolesTest, AMappingLeavesWhatTookItsHoleAlone) {
  const size_t pg = test::PageSize();
  char* taker = nullptr;
  char* first = nullptr;
  {
    test::Mapping m(3 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    first = m.data();
    ASSERT_EQ(m.UnmapPart(m.page(1), pg), 0);
    void* p = mmap(m.page(1), pg, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    ASSERT_EQ(p, m.page(1)) << strerror(errno);
    taker = static_cast<char*>(p);
    taker[0] = 42;
  }
  // msync fails with ENOMEM where nothing is mapped.
  ASSERT_EQ(msync(taker, pg, MS_ASYNC), 0) << "the mapping in the hole survived";
  EXPECT_EQ(taker[0], 42);
  EXPECT_EQ(msync(first, pg, MS_ASYNC), -1) << "the rest is unmapped";
  EXPECT_EQ(msync(taker + pg, pg, MS_ASYNC), -1);
  munmap(taker, pg);
}

}  // namespace
}  // namespace hmmkit
