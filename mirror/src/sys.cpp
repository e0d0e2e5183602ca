#include "hmmkit/mirror/sys.hpp"

#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace hmmkit {

int Sys::Ioctl(int fd, unsigned long request, void* arg) {
  return ::ioctl(fd, request, arg);
}
int Sys::Madvise(void* addr, size_t len, int advice) {
  return ::madvise(addr, len, advice);
}
ssize_t Sys::Pread(int fd, void* buf, size_t count, off_t offset) {
  return ::pread(fd, buf, count, offset);
}
ssize_t Sys::Read(int fd, void* buf, size_t count) {
  return ::read(fd, buf, count);
}

Sys& Sys::Real() {
  static Sys real;
  return real;
}

}  // namespace hmmkit
