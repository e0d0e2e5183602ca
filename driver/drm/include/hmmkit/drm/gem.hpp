/// @file
/// GemBuffer: one GEM object of a DrmDevice, as device memory hmmkit can use.
///
/// Creation: CreateDumb makes a "dumb" buffer (DRM_IOCTL_MODE_CREATE_DUMB), which every KMS driver
/// and vgem offer on the card node; it is the generic way to get GEM memory without a driver's own
/// allocation ioctl. Mapping: Map() maps the whole object into the process (MODE_MAP_DUMB offset on
/// the DRM fd, MAP_SHARED). Sharing: ExportDmaBuf gives a dma-buf fd (PRIME) that another device,
/// another open file or another process imports with Import.
///
/// Lifetime: a GemBuffer holds one reference on its handle in the device's handle table and a
/// shared_ptr to the device; the mapping (if any) is unmapped by the destructor. Moving is allowed,
/// copying is not (Share() takes another reference on the same handle explicitly).
///
/// Thread-safety: a GemBuffer is used by one thread at a time (like a std::vector); different
/// buffers of one device may be used concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "hmmkit/base/status.hpp"
#include "hmmkit/drm/drm_device.hpp"

namespace hmmkit::drm {

class GemBuffer {
 public:
  GemBuffer() = default;
  GemBuffer(GemBuffer&& o) noexcept;
  GemBuffer& operator=(GemBuffer&& o) noexcept;
  GemBuffer(const GemBuffer&) = delete;
  GemBuffer& operator=(const GemBuffer&) = delete;
  ~GemBuffer();

  /// A dumb buffer of at least `size` bytes (rounded up to whole 4 KiB rows of 1024 32-bit pixels).
  /// Errors: EINVAL (size 0), ENOTSUP (the driver has no dumb buffers, or `dev` is a render node:
  /// the ioctl is only allowed on the card node; the message says so), else the ioctl's errno
  /// (ENOMEM).
  static Result<GemBuffer> CreateDumb(const std::shared_ptr<DrmDevice>& dev, size_t size);

  /// Imports a dma-buf into `dev` (see DrmDevice::ImportHandle; the same buffer imported twice
  /// gives the same handle, counted twice). `size` is taken from the dma-buf (lseek SEEK_END).
  static Result<GemBuffer> Import(const std::shared_ptr<DrmDevice>& dev, int dmabuf_fd);

  /// Another holder of the same handle (the handle's count goes up by one).
  GemBuffer Share() const;

  /// Maps the whole object read/write (MAP_SHARED) and returns the address; later calls return the
  /// same mapping. Errors: the errno of MODE_MAP_DUMB (imported buffers of drivers without it:
  /// map the dma-buf instead) or mmap.
  Result<void*> Map();

  /// A dma-buf fd for the object (DRM_CLOEXEC | DRM_RDWR), owned by the caller. Errors: ENOTSUP
  /// (no PRIME export), else the ioctl's errno.
  Result<UniqueFd> ExportDmaBuf() const;

  bool valid() const { return dev_ != nullptr; }
  uint32_t handle() const { return handle_; }
  size_t size() const { return size_; }
  void* mapping() const { return map_; }
  const std::shared_ptr<DrmDevice>& device() const { return dev_; }

 private:
  GemBuffer(std::shared_ptr<DrmDevice> dev, uint32_t handle, size_t size)
      : dev_(std::move(dev)), handle_(handle), size_(size) {}
  void Reset();

  std::shared_ptr<DrmDevice> dev_;
  uint32_t handle_ = 0;
  size_t size_ = 0;
  void* map_ = nullptr;
};

}  // namespace hmmkit::drm
