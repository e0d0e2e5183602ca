// SvmManager: the shared-virtual-memory bookkeeping a driver integrates (kernel: drm_gpusvm plus
// the migration policy a driver builds around it). The device address of a byte is its CPU address.
//
// Pieces:
//   window   an IntervalNotifier over an aligned `Options::window` of the address space, created
//            when its first range is, removed with its last range.
//   range    the unit of device mapping and migration: an aligned chunk from the descending list
//            `Options::chunk_sizes`, chosen around a faulting address so that it fits inside the
//            VMA, the window and the device VA, and does not overlap another range. Never split:
//            an unmap of part of a range marks it, and CollectGarbage evicts and removes it.
//   policy   on a device fault: migrate the range to device memory when it is migratable (private
//            anonymous memory) and not pinned to system memory by thrashing detection, else map
//            system memory remotely. MAP_SHARED, file-backed and hugetlb memory is always mapped
//            remotely, never migrated; so are the brk heap and the main stack, where hmmkit's own
//            threads allocate and run (a migration touching its own pages would wait on itself).
//
// Driver contract (SvmDeviceOps): MapPages programs the device page table and UnmapPages tears it
// down; both run with the manager's notifier lock held (below), so neither may call back into the
// manager, fault CPU memory, or wait for a device fault to be serviced.
//
// Locking (order: callers' locks -> op_mu_ -> mu_ -> ops' own locks):
//   op_mu_  serializes the operations (HandleFault, PrefetchToDevice, Evict, CollectGarbage), so
//           a range or window is never removed under an operation that uses it. Held across
//           migrations and RangeFault: Invalidate never takes it.
//   mu_   the driver lock of the notifier protocol (SetSeq in Invalidate, ReadRetry before
//         MapPages) and the range/window tables. Held across MapPages/UnmapPages. Never held while
//         calling RangeFault, migrating, or evicting (those raise invalidations that take mu_).
// Callbacks into the manager: Invalidate (IntervalNotifierOps) on whatever thread raised the
// invalidation; it takes mu_.
//
// Thread-safety: every public method may be called from any thread except the monitor's fault
// thread (they migrate and wait for invalidations). HandleFault is what a device's fault servicing
// thread calls.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/base/thread_annotations.hpp"
#include "hmmkit/dma/dma_engine.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/notifier.hpp"

namespace hmmkit::driver {

// Where the pages of a range are (kernel: drm_gpusvm's range flags, as one answer).
enum class Residency : uint8_t {
  kUnpopulated,  // no page present anywhere
  kSystem,       // every present page in system memory
  kDevice,       // every page in this device's memory
  kMixed,        // some of each (or another device's pages)
};
const char* ToString(Residency r);

// What the driver implements.
class SvmDeviceOps {
 public:
  virtual ~SvmDeviceOps() = default;
  // Programs device translations for the pages [start, start + pfns.size() * page): every entry is
  // a valid range_fault entry (hmm_pfn), kDevicePrivate entries of this device's owner carry the
  // device page id, every other kind is reached at its CPU address. `write` entries carry
  // hmm_pfn::kWrite. Context: the thread in HandleFault/Prefetch, with the manager's lock held; the
  // entries are valid until it is released. Must not block on CPU or device faults.
  virtual Status MapPages(uintptr_t start, std::span<const uint64_t> pfns) = 0;
  // Removes every device translation in [start, end) and returns only when no device access that
  // used one is in flight. Context: an invalidation (any thread), the manager's lock held.
  virtual void UnmapPages(uintptr_t start, uintptr_t end) = 0;
};

class SvmManager final : public IntervalNotifierOps {
 public:
  struct Options {
    size_t window = size_t(512) << 20;  // notifier window: a power of two >= the largest chunk
    std::vector<size_t> chunk_sizes = {size_t(2) << 20, size_t(64) << 10, size_t(4) << 10};
    uintptr_t device_va_end = uintptr_t(1) << 47;  // device addresses are below this
    std::chrono::milliseconds get_pages_timeout{1000};
    bool migrate_on_fault = true;  // false: device faults always map system memory remotely
    // Thrashing: a range that went to the device and back to the CPU `thrash_migrations` times
    // within `thrash_window` stays in system memory (mapped remotely) for `thrash_pin`.
    unsigned thrash_migrations = 3;
    std::chrono::milliseconds thrash_window{1000};
    std::chrono::milliseconds thrash_pin{200};
  };

  struct Stats {
    uint64_t device_faults = 0;  // HandleFault calls
    uint64_t ranges_created = 0;
    uint64_t ranges_removed = 0;
    uint64_t windows_created = 0;
    uint64_t migrations_to_device = 0;  // range migrations that moved at least one page
    uint64_t pages_to_device = 0;
    uint64_t migrations_to_system = 0;
    uint64_t pages_to_system = 0;
    uint64_t remote_maps = 0;       // faults served by mapping system memory
    uint64_t thrashing_events = 0;  // ranges pinned to system memory by the detector
    uint64_t invalidations = 0;
    uint64_t garbage_collected = 0;
  };

  // `as`, `memory` and `dma` must outlive the manager. Errors: EINVAL for bad Options (chunk
  // sizes not descending powers of two >= the page size, window not a power of two or smaller
  // than the largest chunk).
  static Result<std::unique_ptr<SvmManager>> Create(std::shared_ptr<AddressSpace> as,
                                                    DeviceMemory& memory, dma::DmaEngine& dma,
                                                    SvmDeviceOps& ops, const Options& options);
  ~SvmManager() override;  // evicts nothing; removes every window (no callback runs afterwards)
  SvmManager(const SvmManager&) = delete;
  SvmManager& operator=(const SvmManager&) = delete;

  // A device access at `addr` missed its translation. Finds or creates the range around addr,
  // applies the policy (migrate, or map remotely), faults the pages in (write: writable) and maps
  // them with ops.MapPages. Errors name the address: EFAULT (no VMA, or beyond device_va_end),
  // EPERM (write to a read-only VMA; read of PROT_NONE), ETIMEDOUT (invalidations kept racing).
  // A migration that fails (device memory full after eviction) falls back to a remote map and is
  // counted, not returned.
  Status HandleFault(uintptr_t addr, bool write);

  // Migrates [start, end) to device memory ahead of use (and maps it), range by range. Pages that
  // cannot migrate stay where they are. Errors: EFAULT for an address without a VMA, the
  // migration's errors (ENOMEM).
  Status PrefetchToDevice(uintptr_t start, uintptr_t end);
  // Moves every device page of this device in [start, end) back to system memory.
  Status Evict(uintptr_t start, uintptr_t end);
  // Where the pages of [start, end) are now (no faulting). Errors: EFAULT without a VMA.
  Result<Residency> Scan(uintptr_t start, uintptr_t end);

  // Evicts and removes every range that an unmap touched. Returns how many were removed. Called
  // by HandleFault before it creates ranges; call it from a housekeeping thread too.
  size_t CollectGarbage();

  // [start, end) of each range, in address order (for tests and tools).
  std::vector<std::pair<uintptr_t, uintptr_t>> Ranges() const EXCLUDES(mu_);
  size_t window_count() const EXCLUDES(mu_);
  Stats stats() const EXCLUDES(mu_);

  void Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) override
      EXCLUDES(mu_);

 private:
  struct Window {
    uintptr_t start = 0, end = 0;
    IntervalNotifier notifier;
    size_t ranges = 0;
  };
  struct SvmRange {
    uintptr_t start = 0, end = 0;
    Window* window = nullptr;
    bool unmapped = false;  // part of it was unmapped: CollectGarbage removes it
    std::vector<std::chrono::steady_clock::time_point> migrations;  // recent, for thrashing
    std::chrono::steady_clock::time_point pinned_until{};
  };

  SvmManager(std::shared_ptr<AddressSpace> as, DeviceMemory& memory, dma::DmaEngine& dma,
             SvmDeviceOps& ops, const Options& options);
  // The range containing addr, or a new one (and its window). Stays valid while op_mu_ is held.
  Result<SvmRange*> FindOrCreateLocked(uintptr_t addr, const Vma& vma) REQUIRES(op_mu_, mu_);
  // The fault-in retry loop; MapPages runs under mu_ after ReadRetry said the pages are valid.
  Status GetPagesAndMap(SvmRange& r, bool write) REQUIRES(op_mu_) EXCLUDES(mu_);
  // Migrates r to the device when the policy allows; returns whether pages moved.
  bool MaybeMigrate(SvmRange& r, const Vma& vma, bool forced) REQUIRES(op_mu_) EXCLUDES(mu_);
  Status EvictLocked(uintptr_t start, uintptr_t end) REQUIRES(op_mu_) EXCLUDES(mu_);
  size_t CollectGarbageLocked() REQUIRES(op_mu_) EXCLUDES(mu_);
  Result<Vma> VmaFor(uintptr_t addr) const;

  std::shared_ptr<AddressSpace> as_;
  DeviceMemory& memory_;
  dma::DmaEngine& dma_;
  SvmDeviceOps& ops_;
  const Options options_;
  const size_t page_;

  Mutex op_mu_;
  mutable Mutex mu_ ACQUIRED_AFTER(op_mu_);
  std::map<uintptr_t, SvmRange> ranges_ GUARDED_BY(mu_);                  // by start
  std::map<uintptr_t, std::unique_ptr<Window>> windows_ GUARDED_BY(mu_);  // by start
  Stats stats_ GUARDED_BY(mu_);
};

}  // namespace hmmkit::driver
