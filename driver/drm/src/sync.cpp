#include "hmmkit/drm/sync.hpp"

#include <linux/dma-buf.h>
#include <linux/sync_file.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <xf86drm.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <thread>
#include <utility>

#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/base/mutex.hpp"

namespace hmmkit::drm {

namespace {

// vgem's uAPI (include/uapi/drm/vgem_drm.h; Debian 12's libdrm does not ship it).
struct VgemFenceAttach {
  uint32_t handle;
  uint32_t flags;
  uint32_t out_fence;
  uint32_t pad;
};
struct VgemFenceSignal {
  uint32_t fence;
  uint32_t flags;
};
static_assert(sizeof(VgemFenceAttach) == 16 && sizeof(VgemFenceSignal) == 8);
constexpr uint32_t kVgemFenceWrite = 0x1;
constexpr unsigned long kIoctlVgemFenceAttach = DRM_IOWR(DRM_COMMAND_BASE + 0x1, VgemFenceAttach);
constexpr unsigned long kIoctlVgemFenceSignal = DRM_IOW(DRM_COMMAND_BASE + 0x2, VgemFenceSignal);

// The process-wide fd waiter: one epoll thread completes the fences of ready fds.
// Lock: mu_ is a leaf; never held while a fence completes.
class FdWaiter {
 public:
  static FdWaiter& Get() {
    static FdWaiter waiter;
    return waiter;
  }

  Status Add(UniqueFd fd, FenceFdKind kind, dma::FenceSignal signal) EXCLUDES(mu_) {
    if (epfd_ < 0) return Status::FromErrno(ENOMEM, "fence waiter: no epoll instance");
    epoll_event ev{};
    ev.events = (kind == FenceFdKind::kDmaBufAll ? EPOLLOUT : EPOLLIN) | EPOLLONESHOT;
    ev.data.fd = fd.get();
    const int raw = fd.get();
    MutexLock lock(mu_);
    // Registered under mu_ so that the thread cannot see the event before the entry exists.
    if (epoll_ctl(epfd_, EPOLL_CTL_ADD, raw, &ev) != 0) {
      return Status::FromErrno(errno == EPERM ? EINVAL : errno,
                               "fence fd " + std::to_string(raw) + " cannot be polled");
    }
    entries_.emplace(raw, Entry{std::move(fd), kind, std::move(signal)});
    return Status::Ok();
  }

 private:
  struct Entry {
    UniqueFd fd;
    FenceFdKind kind;
    dma::FenceSignal signal;
  };

  FdWaiter() {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    wake_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (epfd_ < 0 || wake_ < 0) {
      Log().error("drm: fence waiter cannot start: {}", std::strerror(errno));
      return;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = wake_;
    epoll_ctl(epfd_, EPOLL_CTL_ADD, wake_, &ev);
    thread_ = std::thread([this] { Run(); });
  }

  ~FdWaiter() {
    if (thread_.joinable()) {
      const uint64_t one = 1;
      [[maybe_unused]] ssize_t n = write(wake_, &one, sizeof one);
      thread_.join();
    }
    // Fences still pending at exit complete with ECANCELED: no waiter is left hanging.
    std::map<int, Entry> left;
    {
      MutexLock lock(mu_);
      left.swap(entries_);
    }
    for (auto& [fd, e] : left) {
      e.signal.Finish(0, Status::FromErrno(ECANCELED, "fence waiter stopped at exit"));
    }
    if (wake_ >= 0) close(wake_);
    if (epfd_ >= 0) close(epfd_);
  }

  void Run() EXCLUDES(mu_) {
    InternalThreadScope internal("hmmkit-drm-sync");  // never migrate this thread's stack
    epoll_event events[16];
    for (;;) {
      const int n = epoll_wait(epfd_, events, 16, -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        Log().error("drm: fence waiter: epoll_wait: {}", std::strerror(errno));
        return;
      }
      for (int i = 0; i < n; ++i) {
        if (events[i].data.fd == wake_) return;
        std::optional<Entry> taken;
        {
          MutexLock lock(mu_);
          auto it = entries_.find(events[i].data.fd);
          if (it == entries_.end()) continue;
          taken.emplace(std::move(it->second));
          entries_.erase(it);
          epoll_ctl(epfd_, EPOLL_CTL_DEL, taken->fd.get(), nullptr);
        }
        Entry& entry = *taken;
        Status st;
        if (entry.kind == FenceFdKind::kSyncFile) {
          sync_file_info info{};
          if (ioctl(entry.fd.get(), SYNC_IOC_FILE_INFO, &info) == 0 && info.status < 0) {
            st = Status::FromErrno(EIO,
                                   "the fence signaled with error " + std::to_string(info.status));
          }
        } else if (events[i].events & (EPOLLERR | EPOLLHUP)) {
          st = Status::FromErrno(EIO, "dma-buf fence fd reported an error");
        }
        entry.signal.Finish(0, st);
      }
    }
  }

  int epfd_ = -1;
  int wake_ = -1;
  std::thread thread_;
  Mutex mu_;
  std::map<int, Entry> entries_ GUARDED_BY(mu_);
};

}  // namespace

Result<dma::Fence> FenceFromFd(UniqueFd fd, FenceFdKind kind) {
  if (!fd.valid()) return Status::FromErrno(EINVAL, "FenceFromFd: no fd");
  dma::FenceSignal signal(1, 1);
  dma::Fence fence = signal.fence();
  HMMKIT_RETURN_IF_ERROR(FdWaiter::Get().Add(std::move(fd), kind, std::move(signal)));
  return fence;
}

Result<UniqueFd> ExportSyncFile(int dmabuf_fd, bool writes_only) {
  dma_buf_export_sync_file args{};
  args.flags = writes_only ? DMA_BUF_SYNC_WRITE : DMA_BUF_SYNC_RW;
  args.fd = -1;
  if (ioctl(dmabuf_fd, DMA_BUF_IOCTL_EXPORT_SYNC_FILE, &args) != 0) {
    const int err = errno;
    if (err == ENOTTY) {
      return Status::FromErrno(ENOTSUP,
                               "the kernel has no DMA_BUF_IOCTL_EXPORT_SYNC_FILE (Linux 6.0+); "
                               "poll the dma-buf itself");
    }
    return Status::FromErrno(err, "DMA_BUF_IOCTL_EXPORT_SYNC_FILE");
  }
  return UniqueFd(args.fd);
}

bool SyncFileSignaled(int sync_file) {
  pollfd p{sync_file, POLLIN, 0};
  return poll(&p, 1, 0) == 1 && (p.revents & POLLIN) != 0;
}

Result<uint32_t> VgemAttachFence(const GemBuffer& buffer, bool write) {
  DrmDevice& dev = *buffer.device();
  if (dev.version().name != "vgem") {
    return Status::FromErrno(ENOTSUP, "VGEM_FENCE_ATTACH on driver " + dev.version().name);
  }
  VgemFenceAttach args{};
  args.handle = buffer.handle();
  args.flags = write ? kVgemFenceWrite : 0;
  if (const int err = dev.Ioctl(kIoctlVgemFenceAttach, &args); err != 0) {
    return Status::FromErrno(err,
                             "VGEM_FENCE_ATTACH on GEM handle " + std::to_string(buffer.handle()));
  }
  return args.out_fence;
}

Status VgemSignalFence(DrmDevice& dev, uint32_t fence) {
  VgemFenceSignal args{};
  args.fence = fence;
  if (const int err = dev.Ioctl(kIoctlVgemFenceSignal, &args); err != 0) {
    return Status::FromErrno(err, "VGEM_FENCE_SIGNAL of fence " + std::to_string(fence));
  }
  return Status::Ok();
}

// ---- syncobj ----

Result<Syncobj> Syncobj::Create(const std::shared_ptr<DrmDevice>& dev, bool signaled) {
  if (!dev->caps().syncobj) {
    return Status::FromErrno(ENOTSUP, "driver " + dev->version().name + " on " + dev->path() +
                                          " has no syncobj (DRM_CAP_SYNCOBJ is 0)");
  }
  drm_syncobj_create args{};
  args.flags = signaled ? DRM_SYNCOBJ_CREATE_SIGNALED : 0;
  if (const int err = dev->Ioctl(DRM_IOCTL_SYNCOBJ_CREATE, &args); err != 0) {
    return Status::FromErrno(err, "SYNCOBJ_CREATE on " + dev->path());
  }
  return Syncobj(dev, args.handle);
}

Syncobj::Syncobj(Syncobj&& o) noexcept
    : dev_(std::move(o.dev_)), handle_(std::exchange(o.handle_, 0)) {}

Syncobj::~Syncobj() {
  if (dev_ == nullptr) return;
  drm_syncobj_destroy args{};
  args.handle = handle_;
  if (const int err = dev_->Ioctl(DRM_IOCTL_SYNCOBJ_DESTROY, &args); err != 0) {
    Log().error("drm: SYNCOBJ_DESTROY of {}: {}", handle_, std::strerror(err));
  }
}

Status Syncobj::ImportSyncFile(int sync_file) {
  drm_syncobj_handle args{};
  args.handle = handle_;
  args.flags = DRM_SYNCOBJ_FD_TO_HANDLE_FLAGS_IMPORT_SYNC_FILE;
  args.fd = sync_file;
  if (const int err = dev_->Ioctl(DRM_IOCTL_SYNCOBJ_FD_TO_HANDLE, &args); err != 0) {
    return Status::FromErrno(err, "SYNCOBJ_FD_TO_HANDLE (import sync_file)");
  }
  return Status::Ok();
}

Result<UniqueFd> Syncobj::ExportSyncFile() const {
  drm_syncobj_handle args{};
  args.handle = handle_;
  args.flags = DRM_SYNCOBJ_HANDLE_TO_FD_FLAGS_EXPORT_SYNC_FILE;
  args.fd = -1;
  if (const int err = dev_->Ioctl(DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD, &args); err != 0) {
    return Status::FromErrno(err, "SYNCOBJ_HANDLE_TO_FD (export sync_file)");
  }
  return UniqueFd(args.fd);
}

Result<bool> Syncobj::Wait(std::chrono::nanoseconds timeout) const {
  uint32_t handle = handle_;
  drm_syncobj_wait args{};
  args.handles = reinterpret_cast<uintptr_t>(&handle);
  args.count_handles = 1;
  args.flags = DRM_SYNCOBJ_WAIT_FLAGS_WAIT_FOR_SUBMIT;
  // An absolute CLOCK_MONOTONIC deadline, as the ioctl expects.
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  args.timeout_nsec = int64_t(now.tv_sec) * 1000000000 + now.tv_nsec + timeout.count();
  const int err = dev_->Ioctl(DRM_IOCTL_SYNCOBJ_WAIT, &args);
  if (err == ETIME || err == ETIMEDOUT) return false;
  if (err != 0) return Status::FromErrno(err, "SYNCOBJ_WAIT");
  return true;
}

Result<dma::Fence> Syncobj::ToFence() const {
  auto fd = ExportSyncFile();
  if (!fd.ok()) return fd.status();
  return FenceFromFd(std::move(*fd), FenceFdKind::kSyncFile);
}

}  // namespace hmmkit::drm
