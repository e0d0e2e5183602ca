#include "hmmkit/drm/ioctl.hpp"

#include <sys/ioctl.h>

#include <cerrno>
#include <cstring>

namespace hmmkit::drm {

int IoctlLayer::Ioctl(int fd, unsigned long request, void* arg) {
  int ret;
  do {
    ret = ::ioctl(fd, request, arg);
  } while (ret == -1 && (errno == EINTR || errno == EAGAIN));
  return ret;
}

IoctlLayer& IoctlLayer::Real() {
  static IoctlLayer real;
  return real;
}

int RecordingIoctl::Ioctl(int /*fd*/, unsigned long request, void* arg) {
  Call call;
  call.request = request;
  const size_t size = _IOC_SIZE(request);
  if (arg != nullptr && size > 0) {
    call.bytes.resize(size);
    std::memcpy(call.bytes.data(), arg, size);
  }
  {
    MutexLock lock(mu_);
    calls_.push_back(std::move(call));
  }
  return responder_ ? responder_(request, arg) : 0;
}

std::vector<RecordingIoctl::Call> RecordingIoctl::calls() const {
  MutexLock lock(mu_);
  return calls_;
}

void RecordingIoctl::Clear() {
  MutexLock lock(mu_);
  calls_.clear();
}

}  // namespace hmmkit::drm
