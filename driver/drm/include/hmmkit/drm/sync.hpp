/// @file
/// DRM fences, turned into hmmkit's one fence type (dma::Fence).
///
/// The kernel has three shapes of fence that matter here:
///   sync_file   an fd that polls readable once its fences signaled (SYNC_IOC_FILE_INFO tells
///               whether one signaled with an error)
///   dma-buf     the implicit fences of a shared buffer; DMA_BUF_IOCTL_EXPORT_SYNC_FILE (Linux 6.0)
///               snapshots them as a sync_file; older kernels: poll the dma-buf fd itself
///   syncobj     a driver-side container of a fence (DRM_CAP_SYNCOBJ), converted to and from
///               sync_files; vgem has none
/// and vgem adds its own: VGEM_FENCE_ATTACH puts an unsignaled fence on a buffer (its dma-buf's
/// implicit fences), VGEM_FENCE_SIGNAL signals it (it also signals by itself after 10 s).
///
/// FenceFromFd makes a dma::Fence that completes when the fd polls ready. The waiting is done by
/// one process-wide thread (epoll), started on first use and stopped at exit, so a pending fence
/// costs no thread of its own. Context of completion: that thread; it completes the fence with no
/// hmmkit lock held, so Wait()ers wake and OnComplete handlers are posted from there.
#pragma once

#include <chrono>
#include <cstdint>

#include "hmmkit/base/status.hpp"
#include "hmmkit/dma/fence.hpp"
#include "hmmkit/drm/drm_device.hpp"
#include "hmmkit/drm/gem.hpp"

namespace hmmkit::drm {

/// What the fd is, for FenceFromFd.
enum class FenceFdKind : uint8_t {
  kSyncFile,      ///< ready: POLLIN; errors read from SYNC_IOC_FILE_INFO
  kDmaBufWrites,  ///< a dma-buf: ready when its write fences signaled (POLLIN)
  kDmaBufAll,     ///< a dma-buf: ready when all its fences signaled (POLLOUT)
};

/// A fence (one descriptor) that completes when `fd` is ready; takes the fd. A sync_file whose
/// fence signaled with an error completes with EIO. Errors: EINVAL (bad fd), the errno of
/// epoll_ctl.
Result<dma::Fence> FenceFromFd(UniqueFd fd, FenceFdKind kind);

/// Snapshots the implicit fences of a dma-buf as a sync_file: its write fences (`writes_only`) or
/// all of them. Errors: ENOTSUP when the kernel lacks DMA_BUF_IOCTL_EXPORT_SYNC_FILE (Linux < 6.0;
/// use FenceFromFd on the dma-buf instead), else the ioctl's errno.
Result<UniqueFd> ExportSyncFile(int dmabuf_fd, bool writes_only);

/// True once every fence in the sync_file signaled (poll with a zero timeout).
bool SyncFileSignaled(int sync_file);

// ---- vgem ----
/// Attaches a new unsignaled fence to `buffer` (a write fence when `write`), returning its id for
/// VgemSignalFence. Errors: ENOTSUP (not vgem), ENOENT (no such handle), EBUSY (a write fence is
/// already pending on the buffer), else the ioctl's errno.
Result<uint32_t> VgemAttachFence(const GemBuffer& buffer, bool write);
/// Signals the fence. Errors: ENOENT (no such fence), ETIMEDOUT (vgem already signaled it itself
/// after its 10 s timeout; it counts as signaled with an error), else the ioctl's errno.
Status VgemSignalFence(DrmDevice& dev, uint32_t fence);

// ---- syncobj ----
/// A syncobj of a device with DRM_CAP_SYNCOBJ. Holds the handle; destroys it in the destructor.
/// Not thread-safe per object.
class Syncobj {
 public:
  /// Errors: ENOTSUP (the driver has no syncobj; the message names it), else the ioctl's errno.
  static Result<Syncobj> Create(const std::shared_ptr<DrmDevice>& dev, bool signaled);
  Syncobj(Syncobj&& o) noexcept;
  Syncobj& operator=(Syncobj&&) = delete;
  Syncobj(const Syncobj&) = delete;
  ~Syncobj();

  uint32_t handle() const { return handle_; }
  /// Replaces the fence with the one in the sync_file (SYNCOBJ_FD_TO_HANDLE, IMPORT_SYNC_FILE).
  Status ImportSyncFile(int sync_file);
  /// The current fence as a sync_file (SYNCOBJ_HANDLE_TO_FD, EXPORT_SYNC_FILE). EINVAL when it has
  /// no fence yet.
  Result<UniqueFd> ExportSyncFile() const;
  /// Waits until it signaled (SYNCOBJ_WAIT; WAIT_FOR_SUBMIT so that an empty syncobj is waited
  /// for). Returns true when signaled, false on timeout.
  Result<bool> Wait(std::chrono::nanoseconds timeout) const;
  /// The framework's fence for the current fence (through ExportSyncFile).
  Result<dma::Fence> ToFence() const;

 private:
  Syncobj(std::shared_ptr<DrmDevice> dev, uint32_t handle)
      : dev_(std::move(dev)), handle_(handle) {}
  std::shared_ptr<DrmDevice> dev_;
  uint32_t handle_ = 0;
};

}  // namespace hmmkit::drm
