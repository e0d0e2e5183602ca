// The C API of the test_hmm-compatible devices (hmmkit/dmirror.h): a table of open handles.
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <vector>

#include "dmirror_device.hpp"
#include "hmmkit/base/log.hpp"

namespace hmmkit::dmirror {
namespace {

struct Handle {
  pid_t pid = 0;  // the process that opened it: a forked child cannot use its parent's handles
  std::shared_ptr<Mirror> mirror;
};

struct Handles {
  Mutex mu;
  std::vector<Handle> table GUARDED_BY(mu);
};
Handles& Table() {
  static Handles* h = new Handles;  // leaked: handles may be used during exit
  return *h;
}

int Fail(const Status& st) {
  Log().debug("{}", st.ToString());
  errno = st.errno_value() ? st.errno_value() : EIO;
  return -1;
}

std::shared_ptr<Mirror> Lookup(int handle) {
  Handles& h = Table();
  MutexLock lock(h.mu);
  if (handle < 0 || size_t(handle) >= h.table.size()) return nullptr;
  const Handle& e = h.table[size_t(handle)];
  if (e.pid != ::getpid()) return nullptr;
  return e.mirror;
}

}  // namespace
}  // namespace hmmkit::dmirror

using namespace hmmkit;
using namespace hmmkit::dmirror;

extern "C" int hmm_dmirror_open(unsigned index) {
  if (index >= kDeviceCount) {
    errno = ENODEV;
    return -1;
  }
  auto ctx = Context::ForThisProcess();
  if (!ctx.ok()) return Fail(ctx.status());
  auto mirror = std::make_shared<Mirror>(**ctx, (*ctx)->device(index));
  Status st = mirror->Init();
  if (!st.ok()) return Fail(st);
  Handles& h = Table();
  MutexLock lock(h.mu);
  for (size_t i = 0; i < h.table.size(); ++i) {
    if (!h.table[i].mirror) {
      h.table[i] = Handle{::getpid(), std::move(mirror)};
      return int(i);
    }
  }
  h.table.push_back(Handle{::getpid(), std::move(mirror)});
  return int(h.table.size() - 1);
}

extern "C" int hmm_dmirror_ioctl(int handle, unsigned long request, struct hmm_dmirror_cmd* cmd) {
  auto mirror = Lookup(handle);
  if (!mirror || cmd == nullptr) {
    errno = mirror ? EFAULT : EINVAL;
    return -1;
  }
  hmm_dmirror_cmd local = *cmd;
  Status st = mirror->Command(request, local);
  if (!st.ok()) return Fail(st);
  *cmd = local;
  return 0;
}

extern "C" void* hmm_dmirror_mmap(int handle, void* addr, size_t length, int prot, int flags,
                                  off_t offset) {
  if (!Lookup(handle) || length == 0 || offset != 0) {
    errno = EINVAL;
    return MAP_FAILED;
  }
  // Driver-owned pages: a private memfd, populated, mapped shared.
  int fd = memfd_create("hmm_dmirror-mmap", MFD_CLOEXEC);
  if (fd < 0) return MAP_FAILED;
  if (ftruncate(fd, off_t(length)) != 0) {
    int err = errno;
    ::close(fd);
    errno = err;
    return MAP_FAILED;
  }
  void* p = ::mmap(addr, length, prot, MAP_SHARED | MAP_POPULATE | (flags & MAP_FIXED), fd, 0);
  int err = errno;
  ::close(fd);
  errno = err;
  return p;
}

extern "C" int hmm_dmirror_close(int handle) {
  std::shared_ptr<Mirror> dead;
  Handles& h = Table();
  MutexLock lock(h.mu);
  if (handle < 0 || size_t(handle) >= h.table.size() || !h.table[size_t(handle)].mirror) {
    errno = EINVAL;
    return -1;
  }
  Handle& e = h.table[size_t(handle)];
  if (e.pid == ::getpid())
    dead = std::move(e.mirror);
  else
    (void)new std::shared_ptr<Mirror>(std::move(e.mirror));  // the parent's: never destroyed here
  e = Handle{};
  return 0;
}
