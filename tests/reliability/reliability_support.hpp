// Helpers of the reliability tests: commands of the test_hmm-compatible devices
// (hmmkit/dmirror.h) as an errno, an RAII handle, the device residency of a range, and the skip
// that names a known library bug.
#pragma once

#include <errno.h>

#include <cstdint>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/dmirror.h"
#include "test_support.hpp"

// A behaviour that contradicted the library's own contract when this suite was written (each was
// fixed; docs/reliability.md lists them): the test fails here, naming the bug, if it comes back.
#define HMMKIT_FAIL_IF_LIBRARY_BUG(cond, what) \
  if (cond) FAIL() << "library bug came back: " << what

namespace hmmkit::test {

// Runs one command; returns 0 or the errno (EINTR retried, as test_hmm clients do).
inline int DmirrorCmd(int handle, unsigned long request, uintptr_t addr, const void* ptr,
                      uint64_t npages, hmm_dmirror_cmd* out = nullptr) {
  hmm_dmirror_cmd cmd{};
  cmd.addr = addr;
  cmd.ptr = reinterpret_cast<uintptr_t>(ptr);
  cmd.npages = npages;
  int rc;
  do {
    rc = hmm_dmirror_ioctl(handle, request, &cmd);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return errno;
  if (out) *out = cmd;
  return 0;
}

// An open device handle, closed on destruction (unless already closed).
class DmirrorHandle {
 public:
  explicit DmirrorHandle(unsigned index) : fd_(hmm_dmirror_open(index)), err_(errno) {}
  ~DmirrorHandle() {
    if (fd_ >= 0) hmm_dmirror_close(fd_);
  }
  DmirrorHandle(const DmirrorHandle&) = delete;
  DmirrorHandle& operator=(const DmirrorHandle&) = delete;
  int get() const { return fd_; }
  int open_errno() const { return err_; }
  // Forget the handle (the test closed it).
  void Release() { fd_ = -1; }

 private:
  int fd_;
  int err_;
};

// Opens device `index` or skips (ENOTSUP: no userfaultfd) / fails the test.
// NOLINTBEGIN(bugprone-macro-parentheses): `var` is the name being declared
#define HMMKIT_OPEN_DMIRROR_OR_SKIP(var, index)                                       \
  DmirrorHandle var(index);                                                           \
  if (var.get() < 0 && var.open_errno() == ENOTSUP) GTEST_SKIP() << "no userfaultfd"; \
  ASSERT_GE(var.get(), 0) << strerror(var.open_errno())
// NOLINTEND(bugprone-macro-parentheses)

// How many pages of [addr, addr + npages) the snapshot reports as on a device; -1 on error.
inline long DevicePages(int handle, uintptr_t addr, uint64_t npages) {
  std::vector<uint8_t> snap(npages);
  if (DmirrorCmd(handle, HMM_DMIRROR_SNAPSHOT, addr, snap.data(), npages) != 0) return -1;
  long n = 0;
  for (uint8_t b : snap)
    if (b != HMM_DMIRROR_PROT_ERROR && (b & 0x60) != 0) ++n;
  return n;
}

}  // namespace hmmkit::test
