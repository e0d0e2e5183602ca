// A Sys for tests: counts every call and fails the first `fail_*` calls of each kind with `error`
// (EINTR by default), so retry and error paths are tested against the real kernel otherwise.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cerrno>

#include "hmmkit/mirror/sys.hpp"
#include "hmmkit/mirror/uapi.hpp"

namespace hmmkit::test {

class FlakySys : public Sys {
 public:
  int Ioctl(int fd, unsigned long request, void* arg) override {
    ioctl_calls++;
    if (fail_ioctl.fetch_sub(1) > 0) return Fail();
    return Sys::Ioctl(fd, request, arg);
  }
  int Madvise(void* addr, size_t len, int advice) override {
    madvise_calls++;
    if (advice == MADV_POPULATE_READ || advice == MADV_POPULATE_WRITE) populate_calls++;
    if (fail_madvise.fetch_sub(1) > 0) return Fail();
    return Sys::Madvise(addr, len, advice);
  }
  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override {
    pread_calls++;
    if (fail_pread.fetch_sub(1) > 0) return Fail();
    return Sys::Pread(fd, buf, count, offset);
  }
  ssize_t Read(int fd, void* buf, size_t count) override {
    read_calls++;
    if (fail_read.fetch_sub(1) > 0) return Fail();
    return Sys::Read(fd, buf, count);
  }

  std::atomic<int> error{EINTR};
  std::atomic<int> fail_ioctl{0}, fail_madvise{0}, fail_pread{0}, fail_read{0};
  std::atomic<int> ioctl_calls{0}, madvise_calls{0}, populate_calls{0}, pread_calls{0},
      read_calls{0};

 private:
  int Fail() {
    errno = error.load();
    return -1;
  }
};

}  // namespace hmmkit::test
