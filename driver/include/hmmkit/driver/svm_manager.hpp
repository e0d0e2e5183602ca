/// @file
/// SvmManager: the shared-virtual-memory bookkeeping a driver integrates (kernel: drm_gpusvm plus
/// the migration policy a driver builds around it). The device address of a byte is its CPU
/// address.
///
/// Pieces:
///   window   an IntervalNotifier over an aligned `Options::window` of the address space, created
///            when its first range is, removed with its last range.
///   range    the unit of device mapping and migration: an aligned chunk from the descending list
///            `Options::chunk_sizes`, chosen around a faulting address so that it fits inside the
///            VMA, the window and the device VA, and does not overlap another range. Never split:
///            an unmap of part of a range marks it, and CollectGarbage evicts and removes it.
///            A range also lies inside one run of equal advice (svm_attributes.hpp).
///   policy   SvmPolicy decides, per device fault, whether the range migrates to device memory or
///            system memory is mapped remotely, and whether an access-counter notification
///            promotes a remotely mapped range. The default (DefaultSvmPolicy) follows advice,
///            thrashing detection and Options::migrate_on_fault. Memory that cannot migrate is
///            mapped remotely whatever the policy says: MAP_SHARED, file-backed and hugetlb
///            memory, and the brk heap, glibc's thread-arena heaps, the main stack and the
///            anonymous .bss tail of a program, where hmmkit's own threads allocate, run and keep
///            statics (a migration touching its own pages would wait on itself).
///   prefetch explicit (PrefetchToDevice), and a threshold prefetcher: when a fault migrates a
///            range and at least Options::prefetch_threshold of the aligned
///            Options::prefetch_region around it is then on the device, the rest of the region
///            migrates too, so a streaming access pattern stops faulting chunk by chunk.
///   counters a device with access counters reports hot remotely mapped ranges
///            (HandleAccessCounter); the policy may promote them to device memory.
///
/// Driver contract (SvmDeviceOps): MapPages programs the device page table and UnmapPages tears it
/// down; both run with the manager's notifier lock held (below), so neither may call back into the
/// manager, fault CPU memory, or wait for a device fault to be serviced.
///
/// Locking (order: callers' locks -> op_mu_ -> mu_ -> ops' own locks):
///   op_mu_  serializes the operations (HandleFault, HandleAccessCounter, PrefetchToDevice, Evict,
///           Advise, CollectGarbage), so
///           a range or window is never removed under an operation that uses it. Held across
///           migrations and RangeFault: Invalidate never takes it.
///   mu_   the driver lock of the notifier protocol (SetSeq in Invalidate, ReadRetry before
///         MapPages) and the range/window/advice tables. Held across MapPages/UnmapPages. Never
///         held while calling RangeFault, migrating, or evicting (those raise invalidations that
///         take mu_).
/// Callbacks into the manager: Invalidate (IntervalNotifierOps) on whatever thread raised the
/// invalidation; it takes mu_.
///
/// Thread-safety: every public method may be called from any thread except the monitor's fault
/// thread (they migrate and wait for invalidations). HandleFault is what a device's fault servicing
/// thread calls.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/base/thread_annotations.hpp"
#include "hmmkit/dma/dma_engine.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/driver/svm_attributes.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/notifier.hpp"

namespace hmmkit::driver {

/// Where the pages of a range are (kernel: drm_gpusvm's range flags, as one answer).
enum class Residency : uint8_t {
  kUnpopulated,  ///< no page present anywhere
  kSystem,       ///< every present page in system memory
  kDevice,       ///< every page in this device's memory
  kMixed,        ///< some of each (or another device's pages)
};
const char* ToString(Residency r);

/// What the driver implements.
class SvmDeviceOps {
 public:
  virtual ~SvmDeviceOps() = default;
  /// Programs device translations for the pages [start, start + pfns.size() * page): every entry is
  /// a valid range_fault entry (hmm_pfn), kDevicePrivate entries of this device's owner carry the
  /// device page id, every other kind is reached at its CPU address. `write` entries carry
  /// hmm_pfn::kWrite. Context: the thread in HandleFault/Prefetch, with the manager's lock held;
  /// the entries are valid until it is released. Must not block on CPU or device faults.
  virtual Status MapPages(uintptr_t start, std::span<const uint64_t> pfns) = 0;
  /// Removes every device translation in [start, end) and returns only when no device access that
  /// used one is in flight. Context: an invalidation (any thread), the manager's lock held.
  virtual void UnmapPages(uintptr_t start, uintptr_t end) = 0;
};

/// What a policy decision sees.
struct SvmFault {
  uintptr_t addr = 0;
  bool write = false;
  uintptr_t range_start = 0, range_end = 0;  ///< the range that will be mapped
  bool migratable = false;                   ///< the VMA's pages can move (see the header comment)
  SvmAttributes attrs;                       ///< the advice of the range
  bool thrashing = false;        ///< thrashing detection pins the range to system memory now
  bool migrate_on_fault = true;  ///< Options::migrate_on_fault
};

enum class Placement : uint8_t { kMigrate, kRemote };

/// Migration policy hooks a driver can replace (Options::policy). Called with the manager's
/// operation lock held and its table lock not held; must not call back into the manager. A
/// decision to migrate memory that is not migratable is ignored (mapped remotely).
class SvmPolicy {
 public:
  virtual ~SvmPolicy() = default;
  /// A device fault: migrate the range, or map system memory remotely.
  virtual Placement OnDeviceFault(const SvmFault& f) const = 0;
  /// An access-counter notification for a range mapped remotely: migrate it now?
  virtual bool PromoteHotRange(const SvmFault& f) const = 0;
};

/// preferred kDevice: migrate; preferred kSystem, accessed-by, read-mostly reads, thrashing:
/// remote; otherwise migrate_on_fault. Promotion: migratable, not thrashing, no advice against it.
class DefaultSvmPolicy final : public SvmPolicy {
 public:
  Placement OnDeviceFault(const SvmFault& f) const override;
  bool PromoteHotRange(const SvmFault& f) const override;
};

/// An advice change for [start, end): fields left empty keep their value.
struct SvmAdvice {
  std::optional<PreferredLocation> preferred = {};
  std::optional<bool> read_mostly = {};
  std::optional<bool> accessed_by = {};
};

class SvmManager final : public IntervalNotifierOps {
 public:
  struct Options {
    size_t window = size_t(512) << 20;  ///< notifier window: a power of two >= the largest chunk
    std::vector<size_t> chunk_sizes = {size_t(2) << 20, size_t(64) << 10, size_t(4) << 10};
    uintptr_t device_va_end = uintptr_t(1) << 47;  ///< device addresses are below this
    std::chrono::milliseconds get_pages_timeout{1000};
    bool migrate_on_fault = true;  ///< false: device faults always map system memory remotely
    /// Thrashing: a range that went to the device and back to the CPU `thrash_migrations` times
    /// within `thrash_window` stays in system memory (mapped remotely) for `thrash_pin`.
    unsigned thrash_migrations = 3;
    std::chrono::milliseconds thrash_window{1000};
    std::chrono::milliseconds thrash_pin{200};
    /// Threshold prefetcher: 0 turns it off; else a fraction in (0, 1].
    double prefetch_threshold = 0.5;
    size_t prefetch_region = size_t(2) << 20;  ///< a power of two <= window
    std::shared_ptr<const SvmPolicy> policy;   ///< null: DefaultSvmPolicy
  };

  struct Stats {
    uint64_t device_faults = 0;  ///< HandleFault calls
    uint64_t ranges_created = 0;
    uint64_t ranges_removed = 0;
    uint64_t windows_created = 0;
    uint64_t migrations_to_device = 0;  ///< range migrations that moved at least one page
    uint64_t pages_to_device = 0;
    uint64_t migrations_to_system = 0;
    uint64_t pages_to_system = 0;
    uint64_t remote_maps = 0;       ///< faults served by mapping system memory
    uint64_t thrashing_events = 0;  ///< ranges pinned to system memory by the detector
    uint64_t invalidations = 0;
    uint64_t garbage_collected = 0;
    uint64_t prefetch_grows = 0;         ///< faults the threshold prefetcher grew into a region
    uint64_t pages_prefetched = 0;       ///< pages those grows migrated
    uint64_t counter_notifications = 0;  ///< HandleAccessCounter calls
    uint64_t promotions = 0;             ///< hot ranges the policy migrated
  };

  /// `as`, `memory` and `dma` must outlive the manager. Errors: EINVAL for bad Options (chunk
  /// sizes not descending powers of two >= the page size, window not a power of two or smaller
  /// than the largest chunk).
  static Result<std::unique_ptr<SvmManager>> Create(std::shared_ptr<AddressSpace> as,
                                                    DeviceMemory& memory, dma::DmaEngine& dma,
                                                    SvmDeviceOps& ops, const Options& options);
  ~SvmManager() override;  ///< evicts nothing; removes every window (no callback runs afterwards)
  SvmManager(const SvmManager&) = delete;
  SvmManager& operator=(const SvmManager&) = delete;

  /// A device access at `addr` missed its translation. Finds or creates the range around addr,
  /// applies the policy (migrate, or map remotely), faults the pages in (write: writable) and maps
  /// them with ops.MapPages. Errors name the address: EFAULT (no VMA, or beyond device_va_end),
  /// EPERM (write to a read-only VMA; read of PROT_NONE), ETIMEDOUT (invalidations kept racing).
  /// A migration that fails (device memory full after eviction) falls back to a remote map and is
  /// counted, not returned.
  Status HandleFault(uintptr_t addr, bool write);

  /// Migrates [start, end) to device memory ahead of use (and maps it), range by range. Pages that
  /// cannot migrate stay where they are. Errors: EFAULT for an address without a VMA, the
  /// migration's errors (ENOMEM).
  Status PrefetchToDevice(uintptr_t start, uintptr_t end);
  /// Moves every device page of this device in [start, end) back to system memory.
  Status Evict(uintptr_t start, uintptr_t end);

  /// An access counter of the device crossed its threshold for a remotely mapped page at addr.
  /// Asks the policy whether to migrate the range holding it, and does so (then maps it). A page
  /// in no range, or one already on the device, is ignored. Errors: as PrefetchToDevice.
  Status HandleAccessCounter(uintptr_t addr);

  /// Changes the advice of [start, end) (page-aligned). Ranges that straddle the boundary of the
  /// change are evicted and removed (a range lies inside one advice run); accessed_by maps the
  /// present pages of the range at once (remotely, without faulting). Advice is forgotten when
  /// its memory is unmapped. Errors: EINVAL (empty or unaligned), EFAULT (a hole in the range).
  Status Advise(uintptr_t start, uintptr_t end, const SvmAdvice& advice);
  SvmAttributes AttributesAt(uintptr_t addr) const EXCLUDES(mu_);
  /// Where the pages of [start, end) are now (no faulting). Errors: EFAULT without a VMA.
  Result<Residency> Scan(uintptr_t start, uintptr_t end);

  /// Evicts and removes every range that an unmap touched. Returns how many were removed. Called
  /// by HandleFault before it creates ranges; call it from a housekeeping thread too.
  size_t CollectGarbage();

  /// [start, end) of each range, in address order (for tests and tools).
  std::vector<std::pair<uintptr_t, uintptr_t>> Ranges() const EXCLUDES(mu_);
  size_t window_count() const EXCLUDES(mu_);
  Stats stats() const EXCLUDES(mu_);

  void Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) override
      EXCLUDES(mu_);

 private:
  struct Window {
    uintptr_t start = 0, end = 0;
    IntervalNotifier notifier;
    size_t ranges = 0;  ///< a window without ranges stays while advice in it needs unmap events
  };
  struct SvmRange {
    uintptr_t start = 0, end = 0;
    Window* window = nullptr;
    bool unmapped = false;  ///< part of it was unmapped: CollectGarbage removes it
    std::vector<std::chrono::steady_clock::time_point> migrations;  ///< recent, for thrashing
    std::chrono::steady_clock::time_point pinned_until{};
  };

  SvmManager(std::shared_ptr<AddressSpace> as, DeviceMemory& memory, dma::DmaEngine& dma,
             SvmDeviceOps& ops, const Options& options);
  /// The range containing addr, or a new one (and its window). Stays valid while op_mu_ is held.
  Result<SvmRange*> FindOrCreateLocked(uintptr_t addr, const Vma& vma) REQUIRES(op_mu_, mu_);
  SvmRange* FindLocked(uintptr_t addr) REQUIRES(mu_);
  Result<Window*> WindowForLocked(uintptr_t addr) REQUIRES(op_mu_, mu_);
  /// The fault-in retry loop; MapPages runs under mu_ after ReadRetry said the pages are valid.
  /// fault=false maps only the pages present now (runs of valid entries).
  Status GetPagesAndMap(SvmRange& r, bool write, bool fault = true) REQUIRES(op_mu_) EXCLUDES(mu_);
  /// The policy's input for a fault at addr in r (updates thrashing state).
  /// migratable: MigratableFrom() && !InMallocArenaHeap(), computed before mu_ (they query the
  /// kernel).
  SvmFault DescribeFault(SvmRange& r, uintptr_t addr, bool write, bool migratable) REQUIRES(mu_);
  /// Marks r for CollectGarbage (counted, so that a fault with nothing to collect skips the walk).
  void MarkDeadLocked(SvmRange& r) REQUIRES(mu_);
  /// Migrates the private anonymous parts of [start, end), VMA by VMA; returns the pages moved
  /// (an error only when nothing moved).
  Result<size_t> MigrateSpan(uintptr_t start, uintptr_t end) REQUIRES(op_mu_) EXCLUDES(mu_);
  enum class Moved : uint8_t { kSome, kNothing, kFailed };
  /// Migrates r to the device (kNothing: every page was there already or cannot move; kFailed: no
  /// room even after eviction, or a copy failed).
  Moved MigrateRange(SvmRange& r) REQUIRES(op_mu_) EXCLUDES(mu_);
  /// The threshold prefetcher, after a fault at addr migrated a range.
  void MaybeGrow(uintptr_t addr, const Vma& vma) REQUIRES(op_mu_) EXCLUDES(mu_);
  Status EvictLocked(uintptr_t start, uintptr_t end) REQUIRES(op_mu_) EXCLUDES(mu_);
  size_t CollectGarbageLocked() REQUIRES(op_mu_) EXCLUDES(mu_);
  /// Removes windows with neither ranges nor advice (after an unmap cleared advice).
  void RemoveIdleWindows() REQUIRES(op_mu_) EXCLUDES(mu_);
  /// The VMA at addr joined with its compatible neighbours near addr (see the definition).
  /// after_file (optional): set when the walk saw what lies right before the joined VMA (true: a
  /// file mapping ends there), so that MigratableFrom need not ask again.
  Result<Vma> VmaFor(uintptr_t addr, std::optional<bool>* after_file = nullptr) const;
  /// The first address of vma that may migrate: vma.start, the end of the .bss image of the ELF
  /// object right before it (an application mapping merged with that .bss), or ~0 for none of it.
  uintptr_t MigratableFrom(const Vma& vma, std::optional<bool> after_file = {}) const;
  /// Whether addr lies in a glibc thread-arena heap, or a sanitizer's heap (treated like the brk
  /// heap).
  bool InMallocArenaHeap(uintptr_t addr) const;

  std::shared_ptr<AddressSpace> as_;
  DeviceMemory& memory_;
  dma::DmaEngine& dma_;
  SvmDeviceOps& ops_;
  const Options options_;
  const std::shared_ptr<const SvmPolicy> policy_;
  const size_t page_;

  Mutex op_mu_;
  mutable Mutex mu_ ACQUIRED_AFTER(op_mu_);
  std::map<uintptr_t, SvmRange> ranges_ GUARDED_BY(mu_);                  ///< by start
  std::map<uintptr_t, std::unique_ptr<Window>> windows_ GUARDED_BY(mu_);  ///< by start
  SvmAttributeMap attributes_ GUARDED_BY(mu_);
  bool idle_windows_possible_ GUARDED_BY(mu_) = false;
  size_t dead_ranges_ GUARDED_BY(mu_) = 0;  ///< ranges with `unmapped` set
  Stats stats_ GUARDED_BY(mu_);
};

}  // namespace hmmkit::driver
