// The test_hmm parity suite: helpers, the fixture, its instantiations (Private: device 0, Coherent:
// device 2) and the argument checks every command shares. Scenarios live in parity_*_test.cpp.
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "parity_fixture.hpp"

namespace hmmkit::parity {

size_t PageSize() {
  static const size_t ps = size_t(sysconf(_SC_PAGESIZE));
  return ps;
}

size_t PmdSize() {
  static const size_t pmd = [] {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size");
    size_t v = 0;
    if (f >> v && v != 0) return v;
    return size_t{2} << 20;
  }();
  return pmd;
}

void PrintTo(Errno e, std::ostream* os) {
  if (e.value == 0) {
    *os << "0";
    return;
  }
  const char* name = strerrorname_np(e.value);
  *os << (name ? name : "errno " + std::to_string(e.value)) << " (" << strerror(e.value) << ")";
}

Errno Cmd(int handle, unsigned long request, uintptr_t addr, const void* ptr, uint64_t npages,
          hmm_dmirror_cmd* out) {
  hmm_dmirror_cmd cmd{};
  cmd.addr = addr;
  cmd.ptr = reinterpret_cast<uintptr_t>(ptr);
  cmd.npages = npages;
  for (;;) {
    if (hmm_dmirror_ioctl(handle, request, &cmd) == 0) {
      if (out) *out = cmd;
      return Errno{0};
    }
    if (errno != EINTR) return Errno{errno};
  }
}

const char* RequestName(unsigned long request) {
  switch (request) {
    case kRead:
      return "READ";
    case kWrite:
      return "WRITE";
    case kMigrateToDev:
      return "MIGRATE_TO_DEV";
    case kMigrateToSys:
      return "MIGRATE_TO_SYS";
    case kSnapshot:
      return "SNAPSHOT";
    case kExclusive:
      return "EXCLUSIVE";
    case kCheckExclusive:
      return "CHECK_EXCLUSIVE";
    case kRelease:
      return "RELEASE";
    case kFlags:
      return "FLAGS";
    default:
      return "unknown request";
  }
}

std::string ProtString(uint8_t prot) {
  if (prot == HMM_DMIRROR_PROT_ERROR) return "ERROR";
  if (prot == HMM_DMIRROR_PROT_NONE) return "NONE";
  std::string s;
  auto add = [&s](const char* part) {
    if (!s.empty()) s += '|';
    s += part;
  };
  switch (prot & 0xF0) {
    case 0x00:
      break;
    case HMM_DMIRROR_PROT_ZERO:
      add("ZERO");
      break;
    case HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL:
      add("DEV_PRIVATE_LOCAL");
      break;
    case HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE:
      add("DEV_PRIVATE_REMOTE");
      break;
    case HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL:
      add("DEV_COHERENT_LOCAL");
      break;
    case HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE:
      add("DEV_COHERENT_REMOTE");
      break;
    default: {
      char buf[16];
      snprintf(buf, sizeof(buf), "kind 0x%02x", prot & 0xF0);
      add(buf);
    }
  }
  if (prot & HMM_DMIRROR_PROT_READ) add("READ");
  if (prot & HMM_DMIRROR_PROT_WRITE) add("WRITE");
  if (prot & HMM_DMIRROR_PROT_PMD) add("PMD");
  if (prot & HMM_DMIRROR_PROT_PUD) add("PUD");
  return s;
}

Buffer::Buffer(size_t npages, int prot, int flags, int fd) : len_(npages * PageSize()) {
  void* p = mmap(nullptr, len_, prot, flags, fd, 0);
  if (p == MAP_FAILED) {
    map_errno_ = errno;
    len_ = 0;
    return;
  }
  ptr_ = static_cast<char*>(p);
  bounce_.assign(nints(), 0);
}

Buffer Buffer::Aligned(size_t npages, size_t align, int prot, int flags) {
  Buffer b;
  const size_t len = npages * PageSize();
  void* raw = mmap(nullptr, len + align, prot, flags, -1, 0);
  if (raw == MAP_FAILED) {
    b.map_errno_ = errno;
    return b;
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + align - 1) & ~(uintptr_t(align) - 1);
  if (start > base) munmap(raw, start - base);
  if (base + len + align > start + len)
    munmap(reinterpret_cast<void*>(start + len), base + len + align - start - len);
  b.ptr_ = reinterpret_cast<char*>(start);
  b.len_ = len;
  b.bounce_.assign(b.nints(), 0);
  return b;
}

Buffer Buffer::BelowFreeGap(size_t npages, int prot) {
  Buffer b;
  const size_t len = npages * PageSize(), gap = size_t(64) << 20;
  void* raw = mmap(nullptr, len + gap, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    b.map_errno_ = errno;
    return b;
  }
  munmap(static_cast<char*>(raw) + len, gap);
  b.ptr_ = static_cast<char*>(raw);
  b.len_ = len;
  b.bounce_.assign(b.nints(), 0);
  return b;
}

Buffer::Buffer(Buffer&& o) noexcept
    : ptr_(o.ptr_),
      len_(o.len_),
      map_errno_(o.map_errno_),
      bounce_(std::move(o.bounce_)),
      holes_(std::move(o.holes_)) {
  o.ptr_ = nullptr;
  o.len_ = 0;
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    Unmap();
    ptr_ = o.ptr_;
    len_ = o.len_;
    map_errno_ = o.map_errno_;
    bounce_ = std::move(o.bounce_);
    holes_ = std::move(o.holes_);
    o.ptr_ = nullptr;
    o.len_ = 0;
  }
  return *this;
}

::testing::AssertionResult Buffer::mapped() const {
  if (ptr_) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "mmap failed: " << strerror(map_errno_);
}

void Buffer::ClearBounce(uint8_t b) {
  memset(bounce_.data(), b, bounce_.size() * sizeof(int));
}

void Buffer::Unmap() {
  if (ptr_) holes_.UnmapRest(ptr_, len_);
  ptr_ = nullptr;
  len_ = 0;
}

TmpFile::TmpFile(const char* dir, size_t len) {
  fd_ = open(dir, O_TMPFILE | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd_ < 0) {
    // Filesystems without O_TMPFILE: a named file, unlinked at once.
    std::string path = std::string(dir) + "/hmmkit-parity-XXXXXX";
    fd_ = mkostemp(path.data(), O_CLOEXEC);
    if (fd_ < 0) {
      error_ = std::string("no temporary file in ") + dir + ": " + strerror(errno);
      return;
    }
    unlink(path.c_str());
  }
  int r;
  do {
    r = ftruncate(fd_, off_t(len));
  } while (r != 0 && errno == EINTR);
  if (r != 0) {
    error_ = std::string("ftruncate: ") + strerror(errno);
    close(fd_);
    fd_ = -1;
  }
}

TmpFile::~TmpFile() {
  if (fd_ >= 0) close(fd_);
}

::testing::AssertionResult TmpFile::ok() const {
  if (fd_ >= 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << error_;
}

DeviceHandle::DeviceHandle(unsigned index) : index_(index), handle_(hmm_dmirror_open(index)) {
  errno_ = handle_ < 0 ? errno : 0;
}

DeviceHandle::~DeviceHandle() {
  if (handle_ >= 0) hmm_dmirror_close(handle_);
}

::testing::AssertionResult DeviceHandle::ok() const {
  if (handle_ >= 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "hmm_dmirror_open(" << index_ << "): " << strerror(errno_);
}

bool AdviseHuge(const Buffer& b) {
  return madvise(b.data(), b.size(), MADV_HUGEPAGE) == 0;
}

void DmirrorParity::SetUp() {
  dev_ = hmm_dmirror_open(device());
  const int err = errno;
  if (dev_ < 0 && err == ENOTSUP)
    GTEST_SKIP() << "hmm_dmirror_open(" << device() << "): " << strerror(err);
  ASSERT_GE(dev_, 0) << "hmm_dmirror_open(" << device() << "): " << strerror(err);
}

void DmirrorParity::TearDown() {
  if (dev_ >= 0) {
    EXPECT_EQ(hmm_dmirror_close(dev_), 0) << strerror(errno);
  }
  dev_ = -1;
}

uint8_t DmirrorParity::local_kind() const {
  return coherent() ? HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL : HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL;
}

namespace {

// Tests are named <Instantiation>/DmirrorParity.<Test>/<device index> (ctest: parity.<that>).
INSTANTIATE_TEST_SUITE_P(Private, DmirrorParity, ::testing::Values(0u));
INSTANTIATE_TEST_SUITE_P(Coherent, DmirrorParity, ::testing::Values(2u));

const unsigned long kAllRequests[] = {
    kRead,      kWrite,          kMigrateToDev, kMigrateToSys, kSnapshot,
    kExclusive, kCheckExclusive, kRelease,      kFlags,
};

TEST_P(DmirrorParity, UnalignedAddressIsEinval) {
  // Given a mapped, written buffer
  Buffer b(4);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  for (unsigned long request : kAllRequests) {
    // When a command names an address one byte into it
    // Then it is refused with EINVAL
    EXPECT_EQ(Cmd(dev_, request, b.addr() + 1, b.bounce(), 1), EINVAL) << RequestName(request);
  }
  // And the buffer is untouched
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

TEST_P(DmirrorParity, ZeroPagesIsEinval) {
  // Given a mapped buffer
  Buffer b(4);
  ASSERT_TRUE(b.mapped());
  for (unsigned long request : kAllRequests) {
    // When a command names no page at all
    // Then it is refused with EINVAL
    EXPECT_EQ(Cmd(dev_, request, b.addr(), b.bounce(), 0), EINVAL) << RequestName(request);
  }
}

TEST_P(DmirrorParity, OverflowingRangeIsEinval) {
  // Given a buffer and a page count that takes the range past the end of the address space
  Buffer b(4);
  ASSERT_TRUE(b.mapped());
  const uint64_t npages = (UINT64_MAX - b.addr()) / PageSize() + 1;
  for (unsigned long request : {kRead, kWrite, kMigrateToDev, kSnapshot}) {
    // When the command runs
    // Then it is refused with EINVAL
    EXPECT_EQ(Cmd(dev_, request, b.addr(), b.bounce(), npages), EINVAL) << RequestName(request);
  }
}

TEST_P(DmirrorParity, UnknownRequestIsEinval) {
  // Given a buffer
  Buffer b(1);
  ASSERT_TRUE(b.mapped());
  // When a request test_hmm does not define is sent
  // Then it is refused with EINVAL
  EXPECT_EQ(Cmd(dev_, _IOWR('H', 0x7f, struct hmm_dmirror_cmd), b.addr(), b.bounce(), 1), EINVAL);
}

TEST_P(DmirrorParity, BadHandleIsEinval) {
  // Given a buffer, handles that were never opened and one that was closed
  Buffer b(1);
  ASSERT_TRUE(b.mapped());
  int closed = hmm_dmirror_open(peer());
  ASSERT_GE(closed, 0) << strerror(errno);
  ASSERT_EQ(hmm_dmirror_close(closed), 0) << strerror(errno);
  for (int handle : {-1, INT_MAX, closed}) {
    // When a command or a close uses them
    // Then both are refused with EINVAL
    EXPECT_EQ(Cmd(handle, kRead, b.addr(), b.bounce(), 1), EINVAL) << handle;
    errno = 0;
    EXPECT_EQ(hmm_dmirror_close(handle), -1) << handle;
    EXPECT_EQ(errno, EINVAL) << handle;
  }
}

TEST_P(DmirrorParity, OpenOfNoSuchDeviceIsEnodev) {
  // Given the four devices 0..3
  // When a fifth is opened
  errno = 0;
  int h = hmm_dmirror_open(4);
  int err = errno;
  if (h >= 0) hmm_dmirror_close(h);
  // Then the open fails with ENODEV
  EXPECT_EQ(h, -1);
  EXPECT_EQ(err, ENODEV) << strerror(err);
}

TEST_P(DmirrorParity, ReadOfUnmappedPageIsEfault) {
  // Given a written buffer with a hole punched in its middle
  Buffer b = Buffer::BelowFreeGap(4);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  ASSERT_EQ(b.UnmapPart(b.page(2), PageSize()), 0);
  // When the device reads across the hole
  // Then the read fails with EFAULT
  EXPECT_EQ(Run(kRead, b), EFAULT);
  // And a write fails the same way
  EXPECT_EQ(Run(kWrite, b), EFAULT);
}

}  // namespace
}  // namespace hmmkit::parity
