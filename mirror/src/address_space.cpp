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

#include "device_entries.hpp"
#include "fork_guard.hpp"
#include "hmmkit/base/internal_memory.hpp"
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
      features_(options.features ? options.features : &KernelFeatures::Get()),
      entries_(std::make_unique<detail::DeviceEntries>(*this)),
      creator_pid_(::getpid()) {}

Result<std::shared_ptr<AddressSpace>> AddressSpace::Create(const Options& options) {
  RegisterLoaderMemory();  // never migrated: see internal_memory.hpp
  if (options.fault_window == 0 || (options.fault_window & (options.fault_window - 1)) != 0)
    return Status::FromErrno(EINVAL, "AddressSpace: fault_window must be a power of two >= 1");
  if (options.fault_window_max < options.fault_window ||
      (options.fault_window_max & (options.fault_window_max - 1)) != 0)
    return Status::FromErrno(
        EINVAL, "AddressSpace: fault_window_max must be a power of two >= fault_window");
  if (options.granule < size_t(sysconf(_SC_PAGESIZE)) ||
      (options.granule & (options.granule - 1)) != 0) {
    return Status::FromErrno(EINVAL, "AddressSpace: granule must be a power of two >= page size");
  }
  std::shared_ptr<AddressSpace> as(new AddressSpace(options));
  if (EnvTrue("HMMKIT_INTERPOSE")) as->options_.interpose = true;
  HMMKIT_RETURN_IF_ERROR(as->Open());
  ForkGuardAdd(*as);
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
  ForkGuardRemove(*this);
  // Device pages go back to system memory while the monitor can still resolve faults.
  if (::getpid() == creator_pid_ && monitor_) {
    Status st = entries_->EvictAll();
    if (!st.ok()) Log().error("AddressSpace teardown: device pages not evicted: {}", st.ToString());
  }
  if (options_.interpose && monitor_) InterposeDetach(*monitor_);
  // Everything still subscribed learns that the address space goes away.
  notifiers_.Invalidate(NotifierRange{0, UINTPTR_MAX, InvalidateEvent::kRelease, nullptr});
  monitor_.reset();  // joins the monitor threads before the descriptors close
  for (int fd : {maps_fd_, pagemap_fd_, kpageflags_fd_})
    if (fd >= 0) ::close(fd);
}

size_t AddressSpace::LookupDevicePages(uintptr_t start, uintptr_t end,
                                       std::span<DevicePageInfo> out) {
  return entries_->Lookup(start, end, out);
}

size_t AddressSpace::device_page_count() const {
  return entries_->size();
}

Status AddressSpace::MigrateDevicePagesToRam(uintptr_t start, uintptr_t end) {
  HMMKIT_RETURN_IF_ERROR(entries_->RestoreExclusive(start, end));
  for (auto& [va, e] : entries_->Collect(start, end)) {
    if (e.exclusive || e.pagemap->kind() != PageKind::kDevicePrivate) continue;
    detail::DeviceEntry still;
    if (!entries_->Find(va, &still)) continue;  // came back with an earlier window
    HMMKIT_RETURN_IF_ERROR(e.pagemap->MigrateToRam(*this, va));
  }
  return Status::Ok();
}

void AddressSpace::OnCpuPagesGone(uintptr_t start, uintptr_t end) {
  entries_->DropRange(start, end);
}

void AddressSpace::OnCpuPagesMoved(uintptr_t from, uintptr_t to, size_t len) {
  entries_->MoveRange(from, to, len);
}

}  // namespace hmmkit
