// The device's memory-safety guarantees: it never writes through a read-only mapping (read-only
// anonymous memory, a private mapping of a file opened O_RDONLY, memory made read-only after the
// device mirrored or migrated it), and it never touches memory outside what it was asked to touch
// (canary pages around buffers; an index one past the end hits a guard page and fails the launch).
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/svm.hpp"
#include "reliability_support.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using svm::Device;
using svm::KernelContext;
using svm::Location;
using svm::Residency;

constexpr char kCanary = char(0xA5);

bool AllBytes(const char* p, size_t len, char v) {
  for (size_t i = 0; i < len; ++i)
    if (p[i] != v) return false;
  return true;
}

class SvmSecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    svm::DeviceOptions o;
    o.memory_bytes = size_t(16) << 20;
    o.compute_units = 2;
    auto dev = Device::Open(o);
    if (dev.status().errno_value() == ENOTSUP) GTEST_SKIP() << dev.status().ToString();
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }
  // One-thread launches that store `v` at p, or add 1 atomically; each returns the launch's result.
  Status StoreAt(uint64_t* p, uint64_t v) {
    return dev_->Launch(1, [&](KernelContext& k, size_t) { k.Store(p, v); });
  }
  Status AddAt(uint64_t* p) {
    return dev_->Launch(1, [&](KernelContext& k, size_t) { (void)k.AtomicAdd(p, uint64_t(1)); });
  }
  std::unique_ptr<Device> dev_;
};

// A file of `len` canary bytes in /tmp, opened O_RDONLY and mapped MAP_PRIVATE read-only.
struct ReadOnlyFile {
  explicit ReadOnlyFile(size_t len) {
    char path[] = "/tmp/hmmkit-reliability-XXXXXX";
    const int wfd = mkstemp(path);
    EXPECT_GE(wfd, 0);
    std::vector<char> bytes(len, kCanary);
    EXPECT_EQ(write(wfd, bytes.data(), len), ssize_t(len));
    close(wfd);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    unlink(path);
    EXPECT_GE(fd, 0);
    map = Mapping(len, PROT_READ, MAP_PRIVATE, fd);
  }
  ~ReadOnlyFile() {
    map.Unmap();
    close(fd);
  }
  bool FileIntact() const {
    std::vector<char> got(map.size());
    return pread(fd, got.data(), got.size(), 0) == ssize_t(got.size()) &&
           AllBytes(got.data(), got.size(), kCanary);
  }
  int fd = -1;
  Mapping map;
};

// ---- Read-only mappings -------------------------------------------------------------------------

TEST_F(SvmSecurityTest, StoresToReadOnlyAnonymousMemoryAreEpermAndChangeNothing) {
  // Given written memory made read-only, in system memory and read by the device first
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  std::memset(m.data(), kCanary, m.size());
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_READ), 0);
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  uint64_t seen = 0;
  ASSERT_TRUE(dev_->Launch(1, [&](KernelContext& k, size_t) { seen = k.Load(&w[7]); }).ok());
  EXPECT_TRUE(AllBytes(reinterpret_cast<char*>(&seen), 8, kCanary));
  // When a kernel stores to it, or adds atomically
  Status st = StoreAt(&w[7], 0);
  Status at = AddAt(&w[9]);
  // Then both fail with EPERM and no byte changed
  EXPECT_EQ(st.errno_value(), EPERM) << st.ToString();
  EXPECT_EQ(at.errno_value(), EPERM) << at.ToString();
  EXPECT_TRUE(AllBytes(m.data(), m.size(), kCanary));
}

TEST_F(SvmSecurityTest, StoresToAPrivateMappingOfAReadOnlyFileAreEperm) {
  // Given a file opened O_RDONLY, mapped MAP_PRIVATE read-only
  ReadOnlyFile f(2 * PageSize());
  auto* w = reinterpret_cast<uint64_t*>(f.map.data());
  // When a kernel stores to it (a private mapping would take a copy: it must still be refused)
  Status st = StoreAt(&w[0], 1);
  Status at = AddAt(&w[PageSize() / 8]);
  // Then EPERM, and neither the mapping nor the file changed
  EXPECT_EQ(st.errno_value(), EPERM) << st.ToString();
  EXPECT_EQ(at.errno_value(), EPERM) << at.ToString();
  EXPECT_TRUE(AllBytes(f.map.data(), f.map.size(), kCanary));
  EXPECT_TRUE(f.FileIntact());
}

// mprotect is seen only through interposition (docs/architecture.md, "what the monitor sees"):
// without it a device mapping made before the mprotect stays writable. With it, the kernel's
// behaviour: the change invalidates the device's mapping first, and the next store faults.
TEST(SvmInterposedSecurityTest, MemoryMadeReadOnlyAfterMigrationRefusesDeviceStores) {
  if (const char* why = InterpositionUnavailableReason()) GTEST_SKIP() << why;
  ScopedEnv interpose("HMMKIT_INTERPOSE", "1");
  svm::DeviceOptions o;
  o.memory_bytes = 16 * kMiB;
  auto dev = Device::Open(o);
  if (dev.status().errno_value() == ENOTSUP) GTEST_SKIP() << dev.status().ToString();
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  // Given a buffer the device migrated (and mapped writable)
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  std::memset(m.data(), kCanary, m.size());
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  ASSERT_TRUE((*dev)->Prefetch(m.data(), m.size(), Location::kDevice).ok());
  auto r = (*dev)->QueryResidency(m.data(), m.size());
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(*r, Residency::kDevice) << svm::ToString(*r);
  // When the CPU makes it read-only, then a kernel stores to it
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_READ), 0);
  Status st = (*dev)->Launch(1, [&](KernelContext& k, size_t) { k.Store(&w[3], uint64_t(0)); });
  // Then the store is refused with EPERM and the bytes are unchanged
  EXPECT_EQ(st.errno_value(), EPERM) << st.ToString();
  EXPECT_TRUE(AllBytes(m.data(), m.size(), kCanary));
}

TEST_F(SvmSecurityTest, MemoryMadeReadOnlyAfterARemoteMappingRefusesDeviceStores) {
  // Given shared memory (never migrated) that a kernel wrote through a remote mapping
  Mapping m = Mapping::Memfd(2 * kMiB);
  std::memset(m.data(), kCanary, m.size());
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  const uint64_t canary_word = w[0];
  ASSERT_TRUE(StoreAt(&w[0], canary_word).ok());
  // When the CPU makes it read-only, then a kernel stores to it
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_READ), 0);
  Status st = StoreAt(&w[1], 0);
  // Then the store is refused and the bytes are unchanged (remote accesses go through the CPU's
  // page tables: no interposition needed)
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(AllBytes(m.data(), m.size(), kCanary));
  // And the error is EPERM, the contract's for a write to read-only memory
  HMMKIT_FAIL_IF_LIBRARY_BUG(st.errno_value() == EFAULT,
                             "a remote store to memory made read-only after it was mapped fails "
                             "with EFAULT ('system page gone'), not EPERM: "
                                 << st.ToString());
  EXPECT_EQ(st.errno_value(), EPERM) << st.ToString();
}

// ---- Canaries and guard pages -------------------------------------------------------------------

// [PROT_NONE guard][buffer: `pages` pages][read-only canary page][PROT_NONE guard], one
// reservation so that no other mapping can appear in the guards.
struct Guarded {
  explicit Guarded(size_t pages)
      : all((pages + 3) * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS),
        n(pages) {
    std::memset(all.data(), kCanary, all.size());
    EXPECT_EQ(mprotect(all.page(0), PageSize(), PROT_NONE), 0);
    EXPECT_EQ(mprotect(all.page(n + 1), PageSize(), PROT_READ), 0);
    EXPECT_EQ(mprotect(all.page(n + 2), PageSize(), PROT_NONE), 0);
  }
  char* buf() const { return all.page(1); }
  size_t len() const { return n * PageSize(); }
  char* ro_canary() const { return all.page(n + 1); }
  bool CanariesIntact() const {
    if (!AllBytes(ro_canary(), PageSize(), kCanary)) return false;
    if (mprotect(all.page(0), PageSize(), PROT_READ) != 0) return false;
    if (mprotect(all.page(n + 2), PageSize(), PROT_READ) != 0) return false;
    const bool ok = AllBytes(all.page(0), PageSize(), kCanary) &&
                    AllBytes(all.page(n + 2), PageSize(), kCanary);
    (void)mprotect(all.page(0), PageSize(), PROT_NONE);
    (void)mprotect(all.page(n + 2), PageSize(), PROT_NONE);
    return ok;
  }
  Mapping all;
  size_t n;
};

TEST_F(SvmSecurityTest, AKernelRunningOnePastTheEndFailsAtTheGuardAndLeavesTheCanaries) {
  // Given a buffer between a PROT_NONE guard and a read-only canary page, partly on the device
  Guarded g(16);
  auto* w = reinterpret_cast<uint64_t*>(g.buf());
  const size_t n = g.len() / sizeof(uint64_t);
  ASSERT_TRUE(dev_->Prefetch(g.buf(), g.len() / 2, Location::kDevice).ok());
  // When a kernel writes one word past the end (into the read-only page)
  Status over =
      dev_->Launch(n + 1, [&](KernelContext& k, size_t i) { k.Store(&w[i], uint64_t(i)); });
  // Then the launch fails with EPERM there and the canary page is unchanged
  EXPECT_EQ(over.errno_value(), EPERM) << over.ToString();
  EXPECT_NE(over.ToString().find("read-only"), std::string::npos) << over.ToString();
  EXPECT_TRUE(g.CanariesIntact());
  // When a kernel stores one word before the start (the PROT_NONE guard), or reads one page past
  // the canary (the far PROT_NONE guard)
  Status under = dev_->Launch(1, [&](KernelContext& k, size_t) { k.Store(w - 1, uint64_t(0)); });
  auto* past = reinterpret_cast<uint64_t*>(g.ro_canary() + PageSize());
  Status far = dev_->Launch(1, [&](KernelContext& k, size_t) { (void)k.Load(past); });
  // Then both launches fail, and every guard and canary byte is intact
  EXPECT_FALSE(under.ok());
  EXPECT_FALSE(far.ok());
  EXPECT_TRUE(g.CanariesIntact());
  // And the error is EFAULT (no accessible mapping), as for hmm_range_fault
  HMMKIT_FAIL_IF_LIBRARY_BUG(
      under.errno_value() == EPERM || far.errno_value() == EPERM,
      "accesses to PROT_NONE fail with EPERM, not EFAULT: " << under.ToString());
  EXPECT_EQ(under.errno_value(), EFAULT) << under.ToString();
  EXPECT_EQ(far.errno_value(), EFAULT) << far.ToString();
}

// ---- The same guarantees through dmirror
// ----------------------------------------------------------

TEST(DmirrorSecurityTest, WritesThroughReadOnlyMappingsAreEpermAndChangeNothing) {
  HMMKIT_OPEN_DMIRROR_OR_SKIP(h, 0);
  const size_t pages = 4;
  std::vector<char> bounce(pages * PageSize(), 0x11);
  // Given read-only anonymous memory
  Mapping ro(pages * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  std::memset(ro.data(), kCanary, ro.size());
  ASSERT_EQ(mprotect(ro.data(), ro.size(), PROT_READ), 0);
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_WRITE, ro.addr(), bounce.data(), pages), EPERM);
  EXPECT_TRUE(AllBytes(ro.data(), ro.size(), kCanary));
  // Given a private mapping of a file opened O_RDONLY
  ReadOnlyFile f(pages * PageSize());
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_WRITE, f.map.addr(), bounce.data(), pages), EPERM);
  EXPECT_TRUE(AllBytes(f.map.data(), f.map.size(), kCanary));
  EXPECT_TRUE(f.FileIntact());
}

TEST(DmirrorSecurityTest, MemoryMadeReadOnlyAfterMirroringOrMigrationRefusesWrites) {
  HMMKIT_OPEN_DMIRROR_OR_SKIP(h, 0);
  const size_t pages = 4;
  std::vector<char> bounce(pages * PageSize(), 0x22);
  for (unsigned long first : {HMM_DMIRROR_WRITE, HMM_DMIRROR_MIGRATE_TO_DEV}) {
    // Given memory the device mirrored writable (a WRITE) or migrated to itself
    Mapping m(pages * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    std::vector<char> fill(m.size(), kCanary);
    std::vector<char> migrated(m.size());  // MIGRATE_TO_DEV returns the migrated bytes here
    ASSERT_EQ(DmirrorCmd(h.get(), first, m.addr(),
                         first == HMM_DMIRROR_WRITE ? fill.data() : migrated.data(), pages),
              0);
    if (first == HMM_DMIRROR_MIGRATE_TO_DEV) {
      // (the migration carried the zero-filled pages; write the canary through the device)
      ASSERT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_WRITE, m.addr(), fill.data(), pages), 0);
      ASSERT_EQ(DevicePages(h.get(), m.addr(), pages), long(pages));
    }
    // When the CPU makes it read-only and the device writes to it
    ASSERT_EQ(mprotect(m.data(), m.size(), PROT_READ), 0);
    const int err = DmirrorCmd(h.get(), HMM_DMIRROR_WRITE, m.addr(), bounce.data(), pages);
    // Then EPERM, and the bytes are the canary still
    EXPECT_EQ(err, EPERM) << (first == HMM_DMIRROR_WRITE ? "mirrored" : "migrated");
    EXPECT_TRUE(AllBytes(m.data(), m.size(), kCanary))
        << (first == HMM_DMIRROR_WRITE ? "mirrored" : "migrated");
  }
}

TEST(DmirrorSecurityTest, WritesCrossingIntoAGuardOrReadOnlyNeighbourFailAndLeaveTheCanaries) {
  HMMKIT_OPEN_DMIRROR_OR_SKIP(h, 0);
  Guarded g(4);
  std::vector<char> bounce(6 * PageSize(), 0x33);
  // When the device writes the buffer plus the read-only page after it
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_WRITE, reinterpret_cast<uintptr_t>(g.buf()),
                       bounce.data(), 5),
            EPERM);
  // Then the canaries are intact, and so is the buffer (the command faults before it copies)
  EXPECT_TRUE(g.CanariesIntact());
  EXPECT_TRUE(AllBytes(g.buf(), g.len(), kCanary));
  // When the device writes from the guard page before the buffer, then EFAULT, nothing changed
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_WRITE, g.all.addr(), bounce.data(), 3), EFAULT);
  // When it writes the whole reservation up to the far guard, then it fails, nothing changed
  const int err = DmirrorCmd(h.get(), HMM_DMIRROR_WRITE, reinterpret_cast<uintptr_t>(g.buf()),
                             bounce.data(), 6);
  EXPECT_TRUE(err == EPERM || err == EFAULT) << strerror(err);
  EXPECT_TRUE(g.CanariesIntact());
  EXPECT_TRUE(AllBytes(g.buf(), g.len(), kCanary));
  // And a migration of the buffer followed by a device write to it stays inside it (the
  // migration returns the migrated bytes in its own bounce buffer, as test_hmm's does)
  std::vector<char> migrated(4 * PageSize());
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, reinterpret_cast<uintptr_t>(g.buf()),
                       migrated.data(), 4),
            0);
  EXPECT_TRUE(AllBytes(migrated.data(), migrated.size(), kCanary));
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_WRITE, reinterpret_cast<uintptr_t>(g.buf()),
                       bounce.data(), 4),
            0);
  for (size_t i = 0; i < g.len(); ++i)
    ASSERT_EQ(g.buf()[i], 0x33) << "byte " << i << " page " << i / PageSize();
  EXPECT_TRUE(g.CanariesIntact());
}

}  // namespace
}  // namespace hmmkit::test
