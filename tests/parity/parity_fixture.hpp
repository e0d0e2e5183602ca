// The test_hmm parity suite: the fixture and helpers shared by tests/parity/*_test.cpp.
//
// The kernel's hmm-tests (tools/testing/selftests/mm/hmm-tests.c) define what an HMM device does;
// each of their scenarios runs here against hmmkit's dmirror C API (hmmkit/dmirror.h) on a
// device-private device (index 0, its peer is 1) and a device-coherent device (index 2, its peer is
// 3), where the scenario applies to both (instantiations Private and Coherent). Tests read as
// given/when/then; every mapping, file and device handle is owned by an RAII object, so a failed
// assertion leaves no mapping, descriptor or open device behind.
#pragma once

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/dmirror.h"
#include "test_support.hpp"

namespace hmmkit::parity {

// sysconf(_SC_PAGESIZE).
size_t PageSize();
// Ints per page.
inline size_t IntsPerPage() {
  return PageSize() / sizeof(int);
}
// The PMD (THP) size: /sys/kernel/mm/transparent_hugepage/hpage_pmd_size, else 2 MiB.
size_t PmdSize();
// hmm-tests' HMM_BUFFER_SIZE (4 MiB) in pages.
inline size_t DefaultPages() {
  return (size_t{4} << 20) / PageSize();
}

// The requests as constants: the macros expand into unreadable text in assertion messages.
inline constexpr unsigned long kRead = HMM_DMIRROR_READ;
inline constexpr unsigned long kWrite = HMM_DMIRROR_WRITE;
inline constexpr unsigned long kMigrateToDev = HMM_DMIRROR_MIGRATE_TO_DEV;
inline constexpr unsigned long kMigrateToSys = HMM_DMIRROR_MIGRATE_TO_SYS;
inline constexpr unsigned long kSnapshot = HMM_DMIRROR_SNAPSHOT;
inline constexpr unsigned long kExclusive = HMM_DMIRROR_EXCLUSIVE;
inline constexpr unsigned long kCheckExclusive = HMM_DMIRROR_CHECK_EXCLUSIVE;
inline constexpr unsigned long kRelease = HMM_DMIRROR_RELEASE;
inline constexpr unsigned long kFlags = HMM_DMIRROR_FLAGS;

// The outcome of a command: 0 or an errno. Compares as an int; prints as "0" or
// "ENOENT (No such file or directory)".
struct Errno {
  int value;
  constexpr operator int() const { return value; }
};
void PrintTo(Errno e, std::ostream* os);

// Runs one dmirror command on `handle` over [addr, addr + npages pages) with the bounce buffer
// `ptr`. Returns 0, or the errno of the failure; EINTR is retried as test_hmm clients do. On
// success `*out` (when given) holds the command as the device wrote it back (cpages, faults).
Errno Cmd(int handle, unsigned long request, uintptr_t addr, const void* ptr, uint64_t npages,
          hmm_dmirror_cmd* out = nullptr);

// "READ", "MIGRATE_TO_DEV", ... for messages.
const char* RequestName(unsigned long request);
// A snapshot byte decoded: "NONE", "ERROR", "DEV_PRIVATE_LOCAL|WRITE|PMD", ...
std::string ProtString(uint8_t prot);
// The device bits of a snapshot byte (DEV_* values; ZERO excluded).
inline bool IsDevicePage(uint8_t prot) {
  return prot != HMM_DMIRROR_PROT_ERROR && (prot & 0x60) != 0;
}

// int i of a buffer holds f(i): the patterns the tests write and expect.
inline int Seq(size_t i) {
  return int(i);
}
inline int Neg(size_t i) {
  return -int(i);
}
inline int Zero(size_t) {
  return 0;
}

template <class F>
void FillInts(int* p, size_t n, F f) {
  for (size_t i = 0; i < n; ++i) p[i] = f(i);
}

// Success when p[i] == f(i + first) for every i < n; otherwise names the first wrong int and its
// page. Reads through volatile, so a CPU check of a migrated buffer really touches (faults back)
// each page.
template <class F>
::testing::AssertionResult IntsAre(const int* p, size_t n, F f, size_t first = 0) {
  const volatile int* v = p;
  for (size_t i = 0; i < n; ++i) {
    int got = v[i];
    int want = f(i + first);
    if (got != want)
      return ::testing::AssertionFailure() << "int " << i << " (page " << i / IntsPerPage()
                                           << ") holds " << got << ", expected " << want;
  }
  return ::testing::AssertionSuccess();
}

// An mmap'ed test buffer and its bounce buffer (test_hmm's "mirror": what the device copies to and
// from; for SNAPSHOT one byte per page). Owned by the test; unmapped on destruction, except the
// parts the test unmapped with UnmapPart. Move-only.
class Buffer {
 public:
  // `npages` pages: mmap(nullptr, npages pages, prot, flags, fd, 0). A failed mmap leaves the
  // buffer unmapped (see mapped()) and does not fail the test by itself (hugetlb tests skip
  // instead).
  explicit Buffer(size_t npages, int prot = PROT_READ | PROT_WRITE,
                  int flags = MAP_PRIVATE | MAP_ANONYMOUS, int fd = -1);
  // `npages` pages starting at a multiple of `align` (a power of two): a reservation of
  // npages + align bytes, trimmed at both ends.
  static Buffer Aligned(size_t npages, size_t align, int prot = PROT_READ | PROT_WRITE,
                        int flags = MAP_PRIVATE | MAP_ANONYMOUS);
  // `npages` anonymous pages with 64 MiB left free right above them, for tests that punch holes:
  // the kernel puts a new mapping in the highest free gap that fits, so the small mmaps of other
  // threads (a sanitizer's allocator, say) go there and do not refill the hole under the test.
  static Buffer BelowFreeGap(size_t npages, int prot = PROT_READ | PROT_WRITE);
  ~Buffer() { Unmap(); }
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // Success, or the mmap errno.
  ::testing::AssertionResult mapped() const;
  char* data() const { return ptr_; }
  uintptr_t addr() const { return reinterpret_cast<uintptr_t>(ptr_); }
  size_t size() const { return len_; }
  size_t npages() const { return len_ / PageSize(); }
  char* page(size_t i) const { return ptr_ + i * PageSize(); }
  int* ints() const { return reinterpret_cast<int*>(ptr_); }
  size_t nints() const { return len_ / sizeof(int); }

  int* bounce_ints() { return bounce_.data(); }
  uint8_t* bounce_bytes() { return reinterpret_cast<uint8_t*>(bounce_.data()); }
  void* bounce() { return bounce_.data(); }
  // Fill the bounce buffer with the byte `b` (0xFF: "not written by the device").
  void ClearBounce(uint8_t b);

  // munmap [p, p + len), a part of the buffer, and leave it alone from then on: another mapping
  // (the monitor's own message slab, say) may take the freed range, and the destructor must not
  // unmap it. Returns munmap's result. Any thread (one at a time).
  int UnmapPart(void* p, size_t len) { return holes_.Punch(p, len); }

  // munmap now (what is still the buffer's).
  void Unmap();

 private:
  Buffer() = default;
  char* ptr_ = nullptr;
  size_t len_ = 0;
  int map_errno_ = 0;
  std::vector<int> bounce_;
  test::PunchedHoles holes_;
};

// An unlinked regular file of `len` bytes in `dir` (O_TMPFILE, else mkstemp + unlink); closed on
// destruction. Move-less, non-copyable.
class TmpFile {
 public:
  TmpFile(const char* dir, size_t len);
  ~TmpFile();
  TmpFile(const TmpFile&) = delete;
  TmpFile& operator=(const TmpFile&) = delete;
  ::testing::AssertionResult ok() const;
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
  std::string error_;
};

// An open dmirror device handle, closed on destruction (a second device in two-device scenarios).
class DeviceHandle {
 public:
  explicit DeviceHandle(unsigned index);
  ~DeviceHandle();
  DeviceHandle(const DeviceHandle&) = delete;
  DeviceHandle& operator=(const DeviceHandle&) = delete;
  // Success, or the errno of hmm_dmirror_open.
  ::testing::AssertionResult ok() const;
  int get() const { return handle_; }

 private:
  unsigned index_;
  int handle_;
  int errno_;
};

// madvise(MADV_HUGEPAGE) over the buffer; false (with errno) where the kernel has no THP.
bool AdviseHuge(const Buffer& b);

// The fixture: device GetParam() opened in SetUp (the test skips where hmmkit reports ENOTSUP: no
// userfaultfd), closed in TearDown.
class DmirrorParity : public ::testing::TestWithParam<unsigned> {
 protected:
  void SetUp() override;
  void TearDown() override;

  unsigned device() const { return GetParam(); }
  // The other device of the same kind: 1 for 0, 3 for 2.
  unsigned peer() const { return GetParam() + 1; }
  bool coherent() const { return GetParam() >= 2; }
  // The snapshot kind of a page on this device: DEV_PRIVATE_LOCAL or DEV_COHERENT_LOCAL.
  uint8_t local_kind() const;

  // Cmd() on this fixture's device over the first `npages` pages of `b` with its bounce buffer.
  Errno Run(unsigned long request, Buffer& b, uint64_t npages, hmm_dmirror_cmd* out = nullptr) {
    return Cmd(dev_, request, b.addr(), b.bounce(), npages, out);
  }
  Errno Run(unsigned long request, Buffer& b, hmm_dmirror_cmd* out = nullptr) {
    return Run(request, b, b.npages(), out);
  }

  int dev_ = -1;
};

}  // namespace hmmkit::parity
