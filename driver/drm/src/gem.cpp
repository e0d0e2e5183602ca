#include "hmmkit/drm/gem.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xf86drm.h>

#include <cerrno>
#include <utility>

namespace hmmkit::drm {

namespace {
constexpr uint32_t kRowPixels = 1024;  // 32 bpp: one 4 KiB row
constexpr size_t kRowBytes = kRowPixels * 4;
}  // namespace

GemBuffer::GemBuffer(GemBuffer&& o) noexcept
    : dev_(std::move(o.dev_)),
      handle_(std::exchange(o.handle_, 0)),
      size_(std::exchange(o.size_, 0)),
      map_(std::exchange(o.map_, nullptr)) {}

GemBuffer& GemBuffer::operator=(GemBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    dev_ = std::move(o.dev_);
    handle_ = std::exchange(o.handle_, 0);
    size_ = std::exchange(o.size_, 0);
    map_ = std::exchange(o.map_, nullptr);
  }
  return *this;
}

GemBuffer::~GemBuffer() {
  Reset();
}

void GemBuffer::Reset() {
  if (map_ != nullptr) munmap(map_, size_);
  map_ = nullptr;
  if (dev_ != nullptr) dev_->UnrefHandle(handle_);
  dev_.reset();
}

Result<GemBuffer> GemBuffer::CreateDumb(const std::shared_ptr<DrmDevice>& dev, size_t size) {
  if (size == 0) return Status::FromErrno(EINVAL, "GEM buffer of 0 bytes");
  const size_t rows = (size + kRowBytes - 1) / kRowBytes;
  if (rows > UINT32_MAX) return Status::FromErrno(EINVAL, "GEM buffer too large");
  drm_mode_create_dumb args{};
  args.width = kRowPixels;
  args.height = uint32_t(rows);
  args.bpp = 32;
  if (const int err = dev->Ioctl(DRM_IOCTL_MODE_CREATE_DUMB, &args); err != 0) {
    if (!dev->primary() && (err == EACCES || err == EPERM || err == EINVAL)) {
      return Status::FromErrno(ENOTSUP, dev->path() +
                                            " is a render node: dumb buffers are created on the "
                                            "card node (/dev/dri/cardN)");
    }
    if (err == ENOSYS || err == EOPNOTSUPP || err == ENOTTY) {
      return Status::FromErrno(
          ENOTSUP, "driver " + dev->version().name + " on " + dev->path() +
                       " has no dumb buffers (MODE_CREATE_DUMB: " + std::to_string(err) + ")");
    }
    return Status::FromErrno(
        err, "MODE_CREATE_DUMB of " + std::to_string(size) + " bytes on " + dev->path());
  }
  dev->RefHandle(args.handle);
  return GemBuffer(dev, args.handle, size_t(args.size));
}

Result<GemBuffer> GemBuffer::Import(const std::shared_ptr<DrmDevice>& dev, int dmabuf_fd) {
  const off_t end = lseek(dmabuf_fd, 0, SEEK_END);
  if (end <= 0) {
    return Status::FromErrno(end < 0 ? errno : EINVAL,
                             "size of dma-buf fd " + std::to_string(dmabuf_fd));
  }
  lseek(dmabuf_fd, 0, SEEK_SET);
  auto handle = dev->ImportHandle(dmabuf_fd);
  if (!handle.ok()) return handle.status();
  return GemBuffer(dev, *handle, size_t(end));
}

GemBuffer GemBuffer::Share() const {
  if (dev_ == nullptr) return GemBuffer();
  dev_->RefHandle(handle_);
  return GemBuffer(dev_, handle_, size_);
}

Result<void*> GemBuffer::Map() {
  if (dev_ == nullptr) return Status::FromErrno(EINVAL, "Map of an empty GemBuffer");
  if (map_ != nullptr) return map_;
  drm_mode_map_dumb args{};
  args.handle = handle_;
  if (const int err = dev_->Ioctl(DRM_IOCTL_MODE_MAP_DUMB, &args); err != 0) {
    return Status::FromErrno(
        err, "MODE_MAP_DUMB of GEM handle " + std::to_string(handle_) + " on " + dev_->path());
  }
  void* p =
      mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, dev_->fd(), off_t(args.offset));
  if (p == MAP_FAILED) {
    return Status::FromErrno(errno, "mmap of GEM handle " + std::to_string(handle_) + " (" +
                                        std::to_string(size_) + " bytes)");
  }
  map_ = p;
  return map_;
}

Result<UniqueFd> GemBuffer::ExportDmaBuf() const {
  if (dev_ == nullptr) return Status::FromErrno(EINVAL, "export of an empty GemBuffer");
  drm_prime_handle args{};
  args.handle = handle_;
  args.flags = DRM_CLOEXEC | DRM_RDWR;
  if (const int err = dev_->Ioctl(DRM_IOCTL_PRIME_HANDLE_TO_FD, &args); err != 0) {
    if (!dev_->caps().prime_export) {
      return Status::FromErrno(ENOTSUP, "driver " + dev_->version().name + " has no PRIME export");
    }
    return Status::FromErrno(err, "PRIME export of GEM handle " + std::to_string(handle_));
  }
  return UniqueFd(args.fd);
}

}  // namespace hmmkit::drm
