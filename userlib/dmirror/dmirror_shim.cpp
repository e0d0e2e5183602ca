// LD_PRELOAD shim: routes open("/dev/hmm_dmirrorN"), ioctl, mmap and close on those descriptors to
// the dmirror C API, so that an unmodified test_hmm client runs against the emulated devices.
//
// Each routed descriptor is a real descriptor (of /dev/null) so that the number is never reused
// behind our back; the table maps it to a dmirror handle. Everything else goes to the next
// definition (libc, or libhmmkit_interpose for mmap).
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "hmmkit/dmirror.h"

namespace {

constexpr int kMaxFd = 65536;
std::atomic<int> g_handle[kMaxFd];  // fd -> handle + 1 (0: not ours)

template <class F>
F Next(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
}

// "/dev/hmm_dmirrorN" -> N, else -1.
int DeviceIndex(const char* path) {
  static const char kPrefix[] = "/dev/hmm_dmirror";
  if (!path || std::strncmp(path, kPrefix, sizeof kPrefix - 1) != 0) return -1;
  const char* d = path + sizeof kPrefix - 1;
  if (d[0] < '0' || d[0] > '9' || d[1] != '\0') return -1;
  return d[0] - '0';
}

int OpenDevice(int index, int flags) {
  int handle = hmm_dmirror_open(unsigned(index));
  if (handle < 0) return -1;
  using OpenFn = int (*)(const char*, int, ...);
  static OpenFn real_open = Next<OpenFn>("open");
  int fd = real_open("/dev/null", O_RDWR | (flags & O_CLOEXEC));
  if (fd < 0 || fd >= kMaxFd) {
    int err = fd < 0 ? errno : EMFILE;
    if (fd >= 0) close(fd);
    hmm_dmirror_close(handle);
    errno = err;
    return -1;
  }
  g_handle[fd].store(handle + 1);
  return fd;
}

int HandleOf(int fd) {
  return fd >= 0 && fd < kMaxFd ? g_handle[fd].load() - 1 : -1;
}

}  // namespace

extern "C" {

// open, open64 and openat: a dmirror path becomes a device handle, anything else goes on to
// `next` (looked up once per entry point). The mode argument exists only with O_CREAT/O_TMPFILE.
#define HMMKIT_SHIM_MODE(flags, last)    \
  mode_t mode = 0;                       \
  if ((flags) & (O_CREAT | O_TMPFILE)) { \
    va_list ap;                          \
    va_start(ap, last);                  \
    mode = mode_t(va_arg(ap, int));      \
    va_end(ap);                          \
  }

int open(const char* path, int flags, ...) {
  if (int index = DeviceIndex(path); index >= 0) return OpenDevice(index, flags);
  HMMKIT_SHIM_MODE(flags, flags)
  static auto real = Next<int (*)(const char*, int, ...)>("open");
  return real(path, flags, mode);
}

int open64(const char* path, int flags, ...) {
  if (int index = DeviceIndex(path); index >= 0) return OpenDevice(index, flags);
  HMMKIT_SHIM_MODE(flags, flags)
  static auto real = Next<int (*)(const char*, int, ...)>("open64");
  return real(path, flags, mode);
}

int openat(int dirfd, const char* path, int flags, ...) {
  if (int index = DeviceIndex(path); index >= 0) return OpenDevice(index, flags);
  HMMKIT_SHIM_MODE(flags, flags)
  static auto real = Next<int (*)(int, const char*, int, ...)>("openat");
  return real(dirfd, path, flags, mode);
}

int ioctl(int fd, unsigned long request, ...) {
  va_list ap;
  va_start(ap, request);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  int handle = HandleOf(fd);
  if (handle >= 0) return hmm_dmirror_ioctl(handle, request, static_cast<hmm_dmirror_cmd*>(arg));
  using Fn = int (*)(int, unsigned long, ...);
  static Fn real = Next<Fn>("ioctl");
  return real(fd, request, arg);
}

void* mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset) {
  int handle = HandleOf(fd);
  if (handle >= 0) return hmm_dmirror_mmap(handle, addr, length, prot, flags, offset);
  using Fn = void* (*)(void*, size_t, int, int, int, off_t);
  static Fn real = Next<Fn>("mmap");
  return real(addr, length, prot, flags, fd, offset);
}

void* mmap64(void* addr, size_t length, int prot, int flags, int fd, off_t offset) {
  return mmap(addr, length, prot, flags, fd, offset);
}

int close(int fd) {
  int handle = HandleOf(fd);
  if (handle >= 0) {
    g_handle[fd].store(0);
    hmm_dmirror_close(handle);
  }
  using Fn = int (*)(int);
  static Fn real = Next<Fn>("close");
  return real(fd);
}

}  // extern "C"
