#include "test_support.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace hmmkit::test {

Mapping::Mapping(size_t len, int prot, int flags, int fd, off_t offset) : len_(len) {
  addr_ = mmap(nullptr, len, prot, flags, fd, offset);
  if (addr_ == MAP_FAILED) {
    addr_ = nullptr;
    ADD_FAILURE() << "mmap(" << len << ") failed: " << strerror(errno);
    len_ = 0;
  }
}

Mapping Mapping::AlignedAnon(size_t len, size_t align, int prot) {
  // Over-allocate, then trim both ends so that the start is aligned.
  Mapping raw(len + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  uintptr_t start = (raw.addr() + align - 1) & ~(uintptr_t(align) - 1);
  if (start > raw.addr()) munmap(raw.data(), start - raw.addr());
  if (raw.end() > start + len)
    munmap(reinterpret_cast<void*>(start + len), raw.end() - start - len);
  raw.Release();
  void* p = mmap(reinterpret_cast<void*>(start), len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                 -1, 0);
  EXPECT_NE(p, MAP_FAILED) << strerror(errno);
  Mapping m;
  m.addr_ = p;
  m.len_ = len;
  return m;
}

Mapping Mapping::Memfd(size_t len, int prot) {
  int fd = memfd_create("hmmkit-test", MFD_CLOEXEC);
  EXPECT_GE(fd, 0) << strerror(errno);
  EXPECT_EQ(ftruncate(fd, off_t(len)), 0) << strerror(errno);
  Mapping m(len, prot, MAP_SHARED, fd, 0);
  m.fd_ = fd;
  return m;
}

Mapping Mapping::TmpFile(size_t len, const char* dir, int flags) {
  int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  EXPECT_GE(fd, 0) << "O_TMPFILE in " << dir << ": " << strerror(errno);
  EXPECT_EQ(ftruncate(fd, off_t(len)), 0) << strerror(errno);
  Mapping m(len, PROT_READ | PROT_WRITE, flags, fd, 0);
  m.fd_ = fd;
  return m;
}

int PunchedHoles::Punch(void* p, size_t len) {
  const int rc = munmap(p, len);
  if (rc == 0) holes_.emplace_back(static_cast<char*>(p), len);
  return rc;
}

void PunchedHoles::UnmapRest(void* start, size_t len) {
  std::sort(holes_.begin(), holes_.end());
  char* at = static_cast<char*>(start);
  char* const end = at + len;
  for (const auto& [hole, hole_len] : holes_) {
    if (hole > at) munmap(at, size_t(std::min(hole, end) - at));
    at = std::max(at, hole + hole_len);
  }
  if (at < end) munmap(at, size_t(end - at));
  holes_.clear();
}

void Mapping::Unmap() {
  if (addr_) holes_.UnmapRest(addr_, len_);
  addr_ = nullptr;
  len_ = 0;
}

Mapping::~Mapping() {
  Unmap();
  if (fd_ >= 0) close(fd_);
}

Mapping::Mapping(Mapping&& o) noexcept
    : addr_(o.addr_), len_(o.len_), fd_(o.fd_), holes_(std::move(o.holes_)) {
  o.addr_ = nullptr;
  o.len_ = 0;
  o.fd_ = -1;
}

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    Unmap();
    if (fd_ >= 0) close(fd_);
    addr_ = o.addr_;
    len_ = o.len_;
    fd_ = o.fd_;
    holes_ = std::move(o.holes_);
    o.addr_ = nullptr;
    o.len_ = 0;
    o.fd_ = -1;
  }
  return *this;
}

ScopedEnv::ScopedEnv(const char* name, const char* value) : name_(name) {
  if (const char* old = getenv(name)) {
    had_ = true;
    old_ = old;
  }
  if (value)
    setenv(name, value, 1);
  else
    unsetenv(name);
}

ScopedEnv::~ScopedEnv() {
  if (had_)
    setenv(name_.c_str(), old_.c_str(), 1);
  else
    unsetenv(name_.c_str());
}

std::shared_ptr<AddressSpace> MakeAddressSpace(AddressSpace::Options options) {
  auto as = AddressSpace::Create(options);
  if (!as.ok()) {
    ADD_FAILURE() << "AddressSpace::Create: " << as.status().ToString();
    return nullptr;
  }
  return *as;
}

namespace {
#if defined(__SANITIZE_THREAD__)
constexpr bool kTsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kTsan = true;
#else
constexpr bool kTsan = false;
#endif
#else
constexpr bool kTsan = false;
#endif
}  // namespace

bool CopyWriteProtectedPage(void* dst, const void* src, size_t len) {
  iovec local{dst, len}, remote{const_cast<void*>(src), len};
  return ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) == ssize_t(len);
}

const char* InterpositionUnavailableReason() {
  return kTsan ? "ThreadSanitizer interposes munmap/mprotect itself; libhmmkit_interpose cannot "
                 "come first"
               : nullptr;
}

const char* ForkWithMonitorUnavailableReason() {
  return kTsan ? "ThreadSanitizer holds its runtime locks across fork(), which waits for the "
                 "monitor to read UFFD_EVENT_FORK; covered by the gcc, clang and asan lanes"
               : nullptr;
}

bool ThpAvailable() {
  auto t = KernelFeatures::Get().thp;
  return t == ThpMode::kAlways || t == ThpMode::kMadvise;
}

void* UnmappedAddress() {
  // The last page below 2^47: user mappings end at TASK_SIZE, one page lower, so nothing can ever
  // be mapped here (with 5-level paging only by an explicit hint above 47 bits, which nobody in a
  // test gives). A freed hole is not safe: another thread's new malloc arena (64 MiB aligned)
  // filled the bottom of a freed 64 MiB hole in CI.
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  void* p = reinterpret_cast<void*>((uintptr_t(1) << 47) - page);
  // Not mapped: msync of an unmapped range fails with ENOMEM.
  if (msync(p, page, MS_ASYNC) == 0 || errno != ENOMEM) return nullptr;
  return p;
}

}  // namespace hmmkit::test
