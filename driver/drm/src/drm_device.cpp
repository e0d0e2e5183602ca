#include "hmmkit/drm/drm_device.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xf86drm.h>

#include <cerrno>
#include <cstring>

#include "hmmkit/base/log.hpp"

namespace hmmkit::drm {

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) close(fd_);
    fd_ = o.Release();
  }
  return *this;
}

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) close(fd_);
}

namespace {

Status OpenError(int err, const std::string& path) {
  switch (err) {
    case ENOENT:
      return Status::FromErrno(
          err, "no DRM node " + path + " (is the driver loaded? `ls /dev/dri` lists the nodes)");
    case EACCES:
    case EPERM:
      return Status::FromErrno(err, "no permission to open " + path +
                                        " (the user needs the 'render' or 'video' group, or root)");
    default:
      return Status::FromErrno(err, "open " + path);
  }
}

}  // namespace

Result<std::shared_ptr<DrmDevice>> DrmDevice::Open(const std::string& path, IoctlLayer* ioctl) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return OpenError(errno, path);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0 || !S_ISCHR(st.st_mode)) {
    return Status::FromErrno(ENODEV, path + " is not a character device");
  }
  drmVersionPtr v = drmGetVersion(fd.get());
  if (v == nullptr) {
    return Status::FromErrno(ENODEV, path + " is not a DRM node (DRM_IOCTL_VERSION failed)");
  }
  std::shared_ptr<DrmDevice> dev(
      new DrmDevice(std::move(fd), path, ioctl != nullptr ? ioctl : &IoctlLayer::Real()));
  dev->version_.name.assign(v->name, size_t(v->name_len));
  dev->version_.desc.assign(v->desc, size_t(v->desc_len));
  dev->version_.date.assign(v->date, size_t(v->date_len));
  dev->version_.major = v->version_major;
  dev->version_.minor = v->version_minor;
  dev->version_.patch = v->version_patchlevel;
  drmFreeVersion(v);
  dev->primary_ = drmGetNodeTypeFromFd(dev->fd()) == DRM_NODE_PRIMARY;
  dev->ReadCaps();
  const DrmCaps& c = dev->caps_;
  Log().info(
      "drm: opened {} ({} node): driver {} {}.{}.{} ({}); dumb buffers {}, PRIME import {} export "
      "{}, syncobj {} (timeline {})",
      path, dev->primary_ ? "card" : "render", dev->version_.name, dev->version_.major,
      dev->version_.minor, dev->version_.patch, dev->version_.desc, c.dumb_buffer, c.prime_import,
      c.prime_export, c.syncobj, c.syncobj_timeline);
  return dev;
}

std::shared_ptr<DrmDevice> DrmDevice::ForFake(IoctlLayer& ioctl, DriverVersion version) {
  std::shared_ptr<DrmDevice> dev(new DrmDevice(UniqueFd(), "(fake " + version.name + ")", &ioctl));
  dev->version_ = std::move(version);
  return dev;
}

DrmDevice::DrmDevice(UniqueFd fd, std::string path, IoctlLayer* ioctl)
    : fd_(std::move(fd)), path_(std::move(path)), ioctl_(ioctl) {}

DrmDevice::~DrmDevice() {
  MutexLock lock(handles_mu_);
  if (!handle_refs_.empty()) {
    // Closing the file releases them in the kernel; a holder still using one is a bug.
    Log().error("drm: {} closed with {} GEM handles still referenced", path_, handle_refs_.size());
  }
}

void DrmDevice::ReadCaps() {
  const auto cap = [this](uint64_t id) -> uint64_t {
    drm_get_cap c{};
    c.capability = id;
    return Ioctl(DRM_IOCTL_GET_CAP, &c) == 0 ? c.value : 0;
  };
  caps_.dumb_buffer = cap(DRM_CAP_DUMB_BUFFER) != 0;
  const uint64_t prime = cap(DRM_CAP_PRIME);
  caps_.prime_import = (prime & DRM_PRIME_CAP_IMPORT) != 0;
  caps_.prime_export = (prime & DRM_PRIME_CAP_EXPORT) != 0;
  caps_.syncobj = cap(DRM_CAP_SYNCOBJ) != 0;
  caps_.syncobj_timeline = cap(DRM_CAP_SYNCOBJ_TIMELINE) != 0;
}

int DrmDevice::Ioctl(unsigned long request, void* arg) const {
  return ioctl_->Ioctl(fd_.get(), request, arg) == 0 ? 0 : errno;
}

uint32_t DrmDevice::RefHandle(uint32_t handle) {
  MutexLock lock(handles_mu_);
  return ++handle_refs_[handle];
}

void DrmDevice::UnrefHandle(uint32_t handle) {
  MutexLock lock(handles_mu_);
  auto it = handle_refs_.find(handle);
  if (it == handle_refs_.end() || it->second == 0) {
    Log().error("drm: {}: GEM handle {} released more often than taken (bug)", path_, handle);
    return;
  }
  if (--it->second > 0) return;
  handle_refs_.erase(it);
  drm_gem_close close_arg{};
  close_arg.handle = handle;
  if (const int err = Ioctl(DRM_IOCTL_GEM_CLOSE, &close_arg); err != 0) {
    Log().error("drm: {}: GEM_CLOSE of handle {}: {}", path_, handle, std::strerror(err));
  }
}

uint32_t DrmDevice::HandleRefs(uint32_t handle) const {
  MutexLock lock(handles_mu_);
  auto it = handle_refs_.find(handle);
  return it == handle_refs_.end() ? 0 : it->second;
}

Result<uint32_t> DrmDevice::ImportHandle(int dmabuf_fd) {
  // Under the table lock: a GEM_CLOSE of the same handle (last holder going away) must not run
  // between the import and our reference, or we would hold a closed handle.
  MutexLock lock(handles_mu_);
  drm_prime_handle args{};
  args.fd = dmabuf_fd;
  if (const int err = Ioctl(DRM_IOCTL_PRIME_FD_TO_HANDLE, &args); err != 0) {
    return Status::FromErrno(err, "PRIME import of dma-buf fd " + std::to_string(dmabuf_fd) +
                                      " into " + path_ +
                                      (caps_.prime_import ? "" : " (driver has no PRIME import)"));
  }
  ++handle_refs_[args.handle];
  return args.handle;
}

}  // namespace hmmkit::drm
