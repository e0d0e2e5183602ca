/// @file
/// The system calls the mirror layer makes, behind one small interface so that tests can inject
/// errors (EINTR, EAGAIN, EEXIST, ENOMEM), count calls and force races, while real-kernel tests
/// stay the default.
///
/// Contract: each method behaves like the libc call of the same name: it returns -1 and sets errno
/// on failure. Implementations must be thread-safe: the monitor thread and application threads call
/// them concurrently. Owned by whoever creates it; must outlive every AddressSpace that uses it.
#pragma once

#include <sys/types.h>

#include <cstddef>

namespace hmmkit {

class Sys {
 public:
  virtual ~Sys() = default;
  virtual int Ioctl(int fd, unsigned long request, void* arg);
  virtual int Madvise(void* addr, size_t len, int advice);
  virtual ssize_t Pread(int fd, void* buf, size_t count, off_t offset);
  virtual ssize_t Read(int fd, void* buf, size_t count);

  /// The process-wide real implementation.
  static Sys& Real();
};

}  // namespace hmmkit
