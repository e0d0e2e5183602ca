// AddressSpace lifetime: opening the /proc descriptors, starting the monitor, the device-page
// providers, and the process-wide fork generation.
#include "hmmkit/mirror/address_space.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "hmmkit/base/log.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "interpose_client.hpp"

namespace hmmkit {

namespace {

std::atomic<uint64_t> g_fork_generation{0};

void AtForkBump() {
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
}

// Registered once per process: both sides of a fork now share COW pages (not exclusive).
[[maybe_unused]] const bool g_atfork_registered = [] {
  pthread_atfork(nullptr, AtForkBump, AtForkBump);
  return true;
}();

bool EnvTrue(const char* name) {
  const char* v = std::getenv(name);
  return v && (std::string_view(v) == "1" || std::string_view(v) == "true" ||
               std::string_view(v) == "yes");
}

int OpenProc(const char* path, int flags) {
  return ::open(path, flags | O_CLOEXEC);
}

}  // namespace

uint64_t AddressSpace::fork_generation() {
  return g_fork_generation.load(std::memory_order_relaxed);
}
void AddressSpace::NoteFork() {
  AtForkBump();
}

AddressSpace::AddressSpace(const Options& options)
    : options_(options),
      sys_(options.sys ? options.sys : &Sys::Real()),
      features_(options.features ? options.features : &KernelFeatures::Get()) {}

Result<std::shared_ptr<AddressSpace>> AddressSpace::Create(const Options& options) {
  if (options.granule < size_t(sysconf(_SC_PAGESIZE)) ||
      (options.granule & (options.granule - 1)) != 0) {
    return Status::FromErrno(EINVAL, "AddressSpace: granule must be a power of two >= page size");
  }
  std::shared_ptr<AddressSpace> as(new AddressSpace(options));
  if (EnvTrue("HMMKIT_INTERPOSE")) as->options_.interpose = true;
  HMMKIT_RETURN_IF_ERROR(as->Open());
  return as;
}

Status AddressSpace::Open() {
  // /proc/self/maps serves PROCMAP_QUERY; the maps fallback opens it afresh per query (a seq_file
  // read must start at offset 0 to see current VMAs).
  maps_fd_ = OpenProc("/proc/self/maps", O_RDONLY);
  if (maps_fd_ < 0) return Status::FromErrno(errno, "open /proc/self/maps");
  pagemap_fd_ = OpenProc("/proc/self/pagemap", O_RDONLY);
  if (pagemap_fd_ < 0) return Status::FromErrno(errno, "open /proc/self/pagemap");
  if (features_->kpageflags) kpageflags_fd_ = OpenProc("/proc/kpageflags", O_RDONLY);

  if (options_.start_monitor) {
    auto monitor = MmMonitor::Create(*this);
    if (monitor.ok()) {
      monitor_ = std::move(*monitor);
    } else {
      Log().warn(
          "no userfaultfd monitor ({}): CPU-side unmaps and faults are not seen; "
          "device mappings can go stale. See `hmmctl info`.",
          monitor.status().ToString());
    }
  }
  if (options_.interpose) {
    if (!monitor_) {
      return Status::FromErrno(ENOTSUP,
                               "interposition needs the userfaultfd monitor, which failed");
    }
    HMMKIT_RETURN_IF_ERROR(InterposeAttach(*monitor_));
    Log().info(
        "interposition on: munmap/mremap/madvise/mprotect/mmap(MAP_FIXED) notify synchronously");
  }
  return Status::Ok();
}

AddressSpace::~AddressSpace() {
  if (options_.interpose && monitor_) InterposeDetach(*monitor_);
  // Everything still subscribed learns that the address space goes away.
  notifiers_.Invalidate(NotifierRange{0, UINTPTR_MAX, InvalidateEvent::kRelease, nullptr});
  monitor_.reset();  // joins the monitor threads before the descriptors close
  for (int fd : {maps_fd_, pagemap_fd_, kpageflags_fd_})
    if (fd >= 0) ::close(fd);
}

void AddressSpace::AddDevicePageProvider(DevicePageProvider& provider) {
  MutexLock lock(providers_mu_);
  providers_.push_back(&provider);
  provider_count_.store(providers_.size(), std::memory_order_release);
}

void AddressSpace::RemoveDevicePageProvider(DevicePageProvider& provider) {
  MutexLock lock(providers_mu_);
  providers_.erase(std::remove(providers_.begin(), providers_.end(), &provider), providers_.end());
  provider_count_.store(providers_.size(), std::memory_order_release);
}

size_t AddressSpace::LookupDevicePages(uintptr_t start, uintptr_t end,
                                       std::span<DevicePageInfo> out) {
  std::fill(out.begin(), out.end(), DevicePageInfo{});
  MutexLock lock(providers_mu_);
  size_t found = 0;
  for (DevicePageProvider* p : providers_) found += p->LookupRange(start, end, out);
  return found;
}

Status AddressSpace::MigrateDevicePagesToRam(uintptr_t start, uintptr_t end) {
  std::vector<DevicePageProvider*> providers;
  {
    MutexLock lock(providers_mu_);
    providers = providers_;
  }
  for (DevicePageProvider* p : providers) HMMKIT_RETURN_IF_ERROR(p->MigrateToRam(start, end));
  return Status::Ok();
}

}  // namespace hmmkit
