/// @file
/// AddressSpace: hmmkit's view of the calling process's memory (kernel: struct mm_struct as HMM
/// sees it).
///
/// It answers three questions over the real address space, each with the best mechanism the kernel
/// has (KernelFeatures) and a fallback where one is correct:
///   - which VMA covers an address          PROCMAP_QUERY, else /proc/self/maps
///   - what each page of a range is          PAGEMAP_SCAN, else /proc/self/pagemap
///   - make pages present (CPU fault)        MADV_POPULATE_READ/WRITE
/// and it owns the interval-notifier tree and the MmMonitor that turns userfaultfd events into
/// invalidations. One AddressSpace per process at a time: the monitor's userfaultfd registrations
/// are exclusive (a second AddressSpace gets EBUSY registering the same ranges).
///
/// Everything here is a snapshot: another thread may change the mappings right after a call
/// returns. The notifier protocol (notifier.hpp) is how a caller learns that it did.
///
/// Ownership: created by Create(), shared (std::shared_ptr). Destroying the last reference stops
/// the monitor, raises a kRelease invalidation over every subscription still inserted, and closes
/// the descriptors.
#pragma once

#include <sys/types.h>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/device_pages.hpp"
#include "hmmkit/mirror/kernel_features.hpp"
#include "hmmkit/mirror/notifier.hpp"
#include "hmmkit/mirror/page_state.hpp"
#include "hmmkit/mirror/sys.hpp"
#include "hmmkit/mirror/vma.hpp"

namespace hmmkit {

class MmMonitor;
namespace detail {
class DeviceEntries;
}

/// How Snapshot decides kExclusive for present private anonymous pages.
enum class ExclusiveCheck : uint8_t {
  /// Read pagemap bit 56 only once the process has forked (pthread_atfork, or a userfaultfd FORK
  /// event); before any fork every private anon page is exclusive. A raw clone() that shares no
  /// handler and no registered range is not seen: use kAlways in such processes.
  kAuto,
  kAlways,  ///< always read pagemap bit 56 (one extra pread per range)
};

class AddressSpace {
 public:
  struct Options {
    Sys* sys = nullptr;  ///< default: Sys::Real()
    const KernelFeatures* features =
        nullptr;  ///< default: KernelFeatures::Get(); must outlive this
    bool start_monitor =
        true;  ///< open userfaultfd and start the monitor (off: no CPU-side events)
    /// Synchronous before-the-change notifications through libhmmkit_interpose (munmap, mremap,
    /// madvise, mprotect, mmap MAP_FIXED). Also turned on by HMMKIT_INTERPOSE=1. Create fails with
    /// ENOTSUP when asked for and the interposer is not loaded.
    bool interpose = false;
    size_t granule = 2u << 20;  ///< userfaultfd registration granule (power of two, >= page size)
    ExclusiveCheck exclusive = ExclusiveCheck::kAuto;
    /// CPU fault on a device-private page: how many pages around it come back with it (a power of
    /// two; the window is aligned and clipped to the VMA). 1 brings back only the faulting page.
    size_t fault_window = 16;
    /// Fault-around for streams: a fault on the page right after the previous window (sequential
    /// access) brings back twice as many pages, forward from the fault, up to this many; any other
    /// fault starts again from fault_window. A power of two >= fault_window; fault_window turns
    /// the growth off.
    size_t fault_window_max = 512;
    /// A page that migrated to a device stays there at least this long before a CPU fault takes
    /// it back (the fault waits), so CPU and device sharing a page do not ping-pong. 0 disables.
    std::chrono::milliseconds migrate_timeslice{0};
  };

  /// Errors: ENOTSUP (interposition asked for but not loaded; the message says how to load it), the
  /// errno of opening /proc/self/{maps,pagemap}, EINVAL for a bad granule. A missing userfaultfd is
  /// not an error: the monitor is then absent, a warning names the reason, and monitor() returns
  /// nullptr.
  static Result<std::shared_ptr<AddressSpace>> Create(const Options& options);
  static Result<std::shared_ptr<AddressSpace>> Create() { return Create(Options{}); }
  ~AddressSpace();
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;

  const KernelFeatures& features() const { return *features_; }
  Sys& sys() const { return *sys_; }
  const Options& options() const { return options_; }
  NotifierTree& notifiers() { return notifiers_; }
  /// The event monitor, or nullptr when userfaultfd is unavailable or start_monitor was false.
  MmMonitor* monitor() { return monitor_.get(); }

  // ---- VMAs -----------------------------------------------------------------------------------
  /// The VMA containing addr, or nullopt. Errors: only I/O errors of the query itself.
  Result<std::optional<Vma>> FindVma(uintptr_t addr) const;
  /// The VMAs intersecting [start, end), in address order, not clipped. Gaps are simply absent.
  Result<std::vector<Vma>> FindVmas(uintptr_t start, uintptr_t end) const;

  // ---- Pages ----------------------------------------------------------------------------------
  /// Fills out[i] for page start + i * page_size. Pages outside any VMA read as 0. Nothing is
  /// faulted. Errors: EINVAL (unaligned, end <= start, out too small), I/O errors of the query.
  Status Snapshot(uintptr_t start, uintptr_t end, std::span<PageState> out) const;
  /// Same, for a range inside one VMA the caller already looked up (no VMA query).
  Status SnapshotInVma(const Vma& vma, uintptr_t start, uintptr_t end,
                       std::span<PageState> out) const;

  /// Makes [start, end) present, writable when `write` (the CPU fault path of hmm_range_fault),
  /// with one MADV_POPULATE call per contiguous range. EINTR/EAGAIN are retried. Errors: EFAULT
  /// (unmapped, PROT_NONE, or the fault failed), EPERM (write to a read-only mapping), ENOTSUP
  /// (kernel without MADV_POPULATE), ENOMEM, EINVAL (unaligned start, empty range).
  Status Populate(uintptr_t start, uintptr_t end, bool write) const;

  // ---- Device pages (migrate.hpp) -------------------------------------------------------------
  /// What lives on a device in [start, end): out[i] for each page (kSystem where nothing does).
  /// Returns how many device (or device-exclusive) pages were found. Never blocks on a migration.
  size_t LookupDevicePages(uintptr_t start, uintptr_t end, std::span<DevicePageInfo> out);
  /// Brings every device-private and device-exclusive page in [start, end) back to system memory
  /// (each through its pagemap's MigrateToRam). Errors: the first failure.
  Status MigrateDevicePagesToRam(uintptr_t start, uintptr_t end);
  /// Pages recorded on devices (device entries) right now.
  size_t device_page_count() const;
  bool has_device_pages() const { return device_page_count() != 0; }
  /// The pid that created this AddressSpace. In a forked child the object is inherited but dead
  /// (no monitor threads, the parent's descriptors): create a new one there.
  pid_t creator_pid() const { return creator_pid_; }

  /// Called by the monitor's event thread after userfaultfd reported that the CPU pages of
  /// [start, end) are gone (unmap, clear) or moved (mremap); device entries follow. Not for
  /// drivers.
  void OnCpuPagesGone(uintptr_t start, uintptr_t end);
  void OnCpuPagesMoved(uintptr_t from, uintptr_t to, size_t len);
  detail::DeviceEntries& device_entries() { return *entries_; }

  /// Forks seen so far (pthread_atfork in either process, userfaultfd FORK events).
  static uint64_t fork_generation();
  static void NoteFork();

 private:
  explicit AddressSpace(const Options& options);
  Status Open();

  Options options_;
  Sys* sys_;
  const KernelFeatures* features_;
  int maps_fd_ = -1;     ///< /proc/self/maps (PROCMAP_QUERY)
  int pagemap_fd_ = -1;  ///< /proc/self/pagemap (PAGEMAP_SCAN, pread fallback)
  int kpageflags_fd_ = -1;
  NotifierTree notifiers_;
  std::unique_ptr<MmMonitor> monitor_;

  std::unique_ptr<detail::DeviceEntries> entries_;
  pid_t creator_pid_ = 0;

  friend class VmaReader;
  friend class PageReader;
};

}  // namespace hmmkit
