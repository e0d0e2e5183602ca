/// @file
/// DrmDevice: one open DRM node (card or render) and the GEM handle table of that open file.
///
/// GEM handles are per open file and the kernel does not count references to them: a PRIME import
/// of a buffer this file already has returns the SAME handle, and one GEM_CLOSE drops it for every
/// holder. DrmDevice therefore keeps the count itself (HandleTable): every GemBuffer holds one
/// reference, and GEM_CLOSE runs when the last one goes. Nothing else in hmmkit may close a handle.
///
/// Errors of Open name the cause: ENOENT (no such node: is the driver loaded? `ls /dev/dri`),
/// EACCES (no permission on the node: the user needs the `render` or `video` group, or root),
/// ENODEV (not a DRM node).
///
/// Owned by shared_ptr (GemBuffers keep their device alive). Thread-safe: every method may be
/// called from any thread. Locks: handles_mu_ is a leaf lock; the only ioctls run under it are
/// GEM_CLOSE and PRIME_FD_TO_HANDLE (so that an import can never return a handle that a concurrent
/// last release is closing).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/drm/ioctl.hpp"

namespace hmmkit::drm {

/// An owned file descriptor (closed by the destructor).
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.Release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd();

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int Release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

/// What drmGetVersion reports for the driver behind a node.
struct DriverVersion {
  std::string name;  ///< "vgem", "i915", "xe", "amdgpu", "nouveau", ...
  std::string desc;
  std::string date;
  int major = 0, minor = 0, patch = 0;
};

/// The capabilities hmmkit looks at (DRM_IOCTL_GET_CAP); false when the query failed.
struct DrmCaps {
  bool dumb_buffer = false;       ///< DRM_CAP_DUMB_BUFFER (KMS drivers only: vgem has dumb buffers
                                  ///< but says 0, so it is a hint, never a reason to refuse)
  bool prime_import = false;      ///< DRM_CAP_PRIME & DRM_PRIME_CAP_IMPORT
  bool prime_export = false;      ///< DRM_CAP_PRIME & DRM_PRIME_CAP_EXPORT
  bool syncobj = false;           ///< DRM_CAP_SYNCOBJ
  bool syncobj_timeline = false;  ///< DRM_CAP_SYNCOBJ_TIMELINE
};

class DrmDevice : public std::enable_shared_from_this<DrmDevice> {
 public:
  /// Opens `path` (O_RDWR | O_CLOEXEC), reads the driver version and the capabilities, and logs
  /// them. `ioctl` (optional) replaces the real ioctl layer for every later call (the fd is still
  /// opened for real). Errors: see the file comment.
  static Result<std::shared_ptr<DrmDevice>> Open(const std::string& path,
                                                 IoctlLayer* ioctl = nullptr);
  /// A device for a fake ioctl layer only: no node is opened (fd() is -1). For the kernel-SVM
  /// tests.
  static std::shared_ptr<DrmDevice> ForFake(IoctlLayer& ioctl, DriverVersion version);

  ~DrmDevice();
  DrmDevice(const DrmDevice&) = delete;
  DrmDevice& operator=(const DrmDevice&) = delete;

  int fd() const { return fd_.get(); }
  const std::string& path() const { return path_; }
  const DriverVersion& version() const { return version_; }
  const DrmCaps& caps() const { return caps_; }
  /// True for a card (primary) node, false for a render node.
  bool primary() const { return primary_; }

  /// ioctl through the layer; returns 0 or the errno (never -1).
  int Ioctl(unsigned long request, void* arg) const;
  IoctlLayer& ioctl_layer() const { return *ioctl_; }

  // ---- the GEM handle table ----
  /// Takes one reference on `handle` (inserting it with count 1 when absent). Returns the new
  /// count.
  uint32_t RefHandle(uint32_t handle) EXCLUDES(handles_mu_);
  /// Drops one reference; the last one closes the handle (DRM_IOCTL_GEM_CLOSE). Dropping a handle
  /// that has no reference is a bug: logged, nothing closed.
  void UnrefHandle(uint32_t handle) EXCLUDES(handles_mu_);
  /// Current count (0 when absent). For tests.
  uint32_t HandleRefs(uint32_t handle) const EXCLUDES(handles_mu_);
  /// Imports a dma-buf and takes a reference on the handle the kernel gives (the same handle as an
  /// earlier import or creation of the same buffer on this file). Errors: the errno of
  /// DRM_IOCTL_PRIME_FD_TO_HANDLE (EBADF, EINVAL: not a dma-buf; ENOTSUP: no PRIME import).
  Result<uint32_t> ImportHandle(int dmabuf_fd) EXCLUDES(handles_mu_);

 private:
  DrmDevice(UniqueFd fd, std::string path, IoctlLayer* ioctl);
  void ReadCaps();

  UniqueFd fd_;
  const std::string path_;
  IoctlLayer* const ioctl_;
  DriverVersion version_;
  DrmCaps caps_;
  bool primary_ = false;

  mutable Mutex handles_mu_;
  std::map<uint32_t, uint32_t> handle_refs_ GUARDED_BY(handles_mu_);
};

}  // namespace hmmkit::drm
