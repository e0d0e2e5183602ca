/// @file
/// IoctlLayer: the one door through which the DRM backend talks to a kernel driver.
///
/// Every ioctl of driver/drm goes through an IoctlLayer, so that the paths that need hardware we
/// do not have in CI (Xe, nouveau and amdkfd SVM) can be tested against RecordingIoctl, a fake that
/// keeps the bytes of every argument struct, while the paths that vgem serves (discovery, GEM,
/// PRIME, fences) always run against the real kernel.
///
/// Contract: Ioctl behaves like ioctl(2) restarted on EINTR and EAGAIN (as libdrm's drmIoctl does):
/// it returns the ioctl's result, or -1 with errno set. Implementations are thread-safe. The layer
/// must outlive every DrmDevice that uses it.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "hmmkit/base/mutex.hpp"

namespace hmmkit::drm {

class IoctlLayer {
 public:
  virtual ~IoctlLayer() = default;
  virtual int Ioctl(int fd, unsigned long request, void* arg);

  /// The process-wide real implementation (ioctl(2)).
  static IoctlLayer& Real();
};

/// A fake for drivers whose hardware CI does not have: records each call (request number and the
/// argument bytes as they were when the call was made; the size comes from the request's _IOC_SIZE)
/// and answers with `responder`, which may write into the argument (as the kernel would) and
/// returns the ioctl's result (or -1 after setting errno). Without a responder every call succeeds
/// and returns 0. The fd is not used.
class RecordingIoctl final : public IoctlLayer {
 public:
  struct Call {
    unsigned long request = 0;
    std::vector<uint8_t> bytes;  ///< the argument on entry
  };
  using Responder = std::function<int(unsigned long request, void* arg)>;

  explicit RecordingIoctl(Responder responder = {}) : responder_(std::move(responder)) {}
  int Ioctl(int fd, unsigned long request, void* arg) override;

  std::vector<Call> calls() const EXCLUDES(mu_);
  void Clear() EXCLUDES(mu_);

 private:
  const Responder responder_;
  mutable Mutex mu_;  ///< leaf lock; never held while the responder runs
  std::vector<Call> calls_ GUARDED_BY(mu_);
};

}  // namespace hmmkit::drm
