// AddressSpace: hmmkit's view of the calling process's memory (kernel: struct mm_struct as HMM sees
// it).
//
// It answers three questions over the real address space, each with the best mechanism the kernel
// has (KernelFeatures) and a fallback where one is correct:
//   - which VMA covers an address          PROCMAP_QUERY, else /proc/self/maps
//   - what each page of a range is          PAGEMAP_SCAN, else /proc/self/pagemap
//   - make pages present (CPU fault)        MADV_POPULATE_READ/WRITE
// and it owns the interval-notifier tree and the MmMonitor that turns userfaultfd events into
// invalidations. One AddressSpace per process at a time: the monitor's userfaultfd registrations
// are exclusive (a second AddressSpace gets EBUSY registering the same ranges).
//
// Everything here is a snapshot: another thread may change the mappings right after a call returns.
// The notifier protocol (notifier.hpp) is how a caller learns that it did.
//
// Ownership: created by Create(), shared (std::shared_ptr). Destroying the last reference stops the
// monitor, raises a kRelease invalidation over every subscription still inserted, and closes the
// descriptors.
#pragma once

#include <atomic>
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

// How Snapshot decides kExclusive for present private anonymous pages.
enum class ExclusiveCheck : uint8_t {
  // Read pagemap bit 56 only once the process has forked (pthread_atfork, or a userfaultfd FORK
  // event); before any fork every private anon page is exclusive. A raw clone() that shares no
  // handler and no registered range is not seen: use kAlways in such processes.
  kAuto,
  kAlways,  // always read pagemap bit 56 (one extra pread per range)
};

class AddressSpace {
 public:
  struct Options {
    Sys* sys = nullptr;                        // default: Sys::Real()
    const KernelFeatures* features = nullptr;  // default: KernelFeatures::Get(); must outlive this
    bool start_monitor = true;  // open userfaultfd and start the monitor (off: no CPU-side events)
    // Synchronous before-the-change notifications through libhmmkit_interpose (munmap, mremap,
    // madvise, mprotect, mmap MAP_FIXED). Also turned on by HMMKIT_INTERPOSE=1. Create fails with
    // ENOTSUP when asked for and the interposer is not loaded.
    bool interpose = false;
    size_t granule = 2u << 20;  // userfaultfd registration granule (power of two, >= page size)
    ExclusiveCheck exclusive = ExclusiveCheck::kAuto;
  };

  // Errors: ENOTSUP (interposition asked for but not loaded; the message says how to load it), the
  // errno of opening /proc/self/{maps,pagemap}, EINVAL for a bad granule. A missing userfaultfd is
  // not an error: the monitor is then absent, a warning names the reason, and monitor() returns
  // nullptr.
  static Result<std::shared_ptr<AddressSpace>> Create(const Options& options);
  static Result<std::shared_ptr<AddressSpace>> Create() { return Create(Options{}); }
  ~AddressSpace();
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;

  const KernelFeatures& features() const { return *features_; }
  Sys& sys() const { return *sys_; }
  const Options& options() const { return options_; }
  NotifierTree& notifiers() { return notifiers_; }
  // The event monitor, or nullptr when userfaultfd is unavailable or start_monitor was false.
  MmMonitor* monitor() { return monitor_.get(); }

  // ---- VMAs -----------------------------------------------------------------------------------
  // The VMA containing addr, or nullopt. Errors: only I/O errors of the query itself.
  Result<std::optional<Vma>> FindVma(uintptr_t addr) const;
  // The VMAs intersecting [start, end), in address order, not clipped. Gaps are simply absent.
  Result<std::vector<Vma>> FindVmas(uintptr_t start, uintptr_t end) const;

  // ---- Pages ----------------------------------------------------------------------------------
  // Fills out[i] for page start + i * page_size. Pages outside any VMA read as 0. Nothing is
  // faulted. Errors: EINVAL (unaligned, end <= start, out too small), I/O errors of the query.
  Status Snapshot(uintptr_t start, uintptr_t end, std::span<PageState> out) const;
  // Same, for a range inside one VMA the caller already looked up (no VMA query).
  Status SnapshotInVma(const Vma& vma, uintptr_t start, uintptr_t end,
                       std::span<PageState> out) const;

  // Makes [start, end) present, writable when `write` (the CPU fault path of hmm_range_fault), with
  // one MADV_POPULATE call per contiguous range. EINTR/EAGAIN are retried.
  // Errors: EFAULT (unmapped, PROT_NONE, or the fault failed), EPERM (write to a read-only
  // mapping), ENOTSUP (kernel without MADV_POPULATE), ENOMEM, EINVAL (unaligned start, empty
  // range).
  Status Populate(uintptr_t start, uintptr_t end, bool write) const;

  // ---- Device pages (driver/) -----------------------------------------------------------------
  // Registers a provider consulted by range_fault. The provider must be removed before it dies.
  void AddDevicePageProvider(DevicePageProvider& provider) EXCLUDES(providers_mu_);
  void RemoveDevicePageProvider(DevicePageProvider& provider) EXCLUDES(providers_mu_);
  // Looks the range up in every provider; returns how many device pages were found.
  size_t LookupDevicePages(uintptr_t start, uintptr_t end, std::span<DevicePageInfo> out)
      EXCLUDES(providers_mu_);
  // Calls MigrateToRam on the provider(s) owning pages in [start, end).
  Status MigrateDevicePagesToRam(uintptr_t start, uintptr_t end) EXCLUDES(providers_mu_);
  bool has_device_pages() const { return provider_count_.load(std::memory_order_acquire) != 0; }

  // Forks seen so far (pthread_atfork in either process, userfaultfd FORK events).
  static uint64_t fork_generation();
  static void NoteFork();

 private:
  explicit AddressSpace(const Options& options);
  Status Open();

  Options options_;
  Sys* sys_;
  const KernelFeatures* features_;
  int maps_fd_ = -1;     // /proc/self/maps (PROCMAP_QUERY)
  int pagemap_fd_ = -1;  // /proc/self/pagemap (PAGEMAP_SCAN, pread fallback)
  int kpageflags_fd_ = -1;
  NotifierTree notifiers_;
  std::unique_ptr<MmMonitor> monitor_;

  // Leaf lock: held across LookupRange (providers must not call back into AddressSpace), not across
  // MigrateToRam.
  mutable Mutex providers_mu_;
  std::vector<DevicePageProvider*> providers_ GUARDED_BY(providers_mu_);
  std::atomic<size_t> provider_count_{0};

  friend class VmaReader;
  friend class PageReader;
};

}  // namespace hmmkit
