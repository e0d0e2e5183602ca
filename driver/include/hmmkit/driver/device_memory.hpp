/// @file
/// DeviceMemory: one device's memory and its page map (kernel: a struct dev_pagemap with its
/// ZONE_DEVICE pages, plus the driver's chunk allocator, as nouveau's dmem or test_hmm's dmirror
/// chunks do it).
///
/// Parts
///   - The arena: the device's memory, emulated as a memfd of `capacity` bytes mapped MAP_SHARED
///     at base(), or memory the driver provides (Options::external: a GEM object exported as a
///     dma-buf, for the DRM backend). Page id i is the 4 KiB at base() + i * 4096 (ArenaFd() at
///     ArenaOffset(i)), so a coherent page can be mapped anywhere else (the application's address)
///     as the same bytes.
///   - Chunks: the arena is carved into chunks of chunk_size bytes (2 MiB = 512 pages by default).
///     A chunk is the unit of eviction and of compound allocation.
///   - Pages: each has a reference count (kernel: the ZONE_DEVICE struct page refcount), the owner
///     token of the pagemap, driver_data (kernel: zone_device_data) and, set by the migration code,
///     the reverse mapping {AddressSpace, va} that eviction uses to find where the page is mapped.
///   - Folios: AllocChunk hands out a whole chunk as one compound page (a 2 MiB device folio). The
///     folio has ONE reference count, kept on its head page (the first id): GetPage/PutPage on any
///     of its subpages take or drop a reference on the folio (kernel: gup grabs the head page once
///     for its subpages), and the folio is freed as a whole when that count reaches zero.
///     SplitFolio turns it into chunk_size / 4096 independent pages, each starting with the
///     folio's count (kernel: splitting a device folio), for when part of it must go.
///   - Eviction: when an allocation cannot be satisfied, the coldest chunk that has pages in use
///     (least recently Touch()ed or allocated from) is handed to Options::evict, the driver's hook,
///     which moves the data back to system memory and drops the references (mirror's
///     MigrateDevicePages, the kernel's migrate_device_range); the allocation then retries.
///   - Device memory failure (kernel: dev_pagemap_ops.memory_failure): MarkPoisoned retires a page
///     for good. Poisoning the CPU address (UFFDIO_POISON) is the caller's business.
///
/// What a driver writes: the evict hook (required for oversubscription; the default refuses, so
/// allocations fail with ENOMEM once the memory is full) and, optionally, on_free.
///
/// Example (a migration to the device; error handling shortened):
///
/// @code{.unparsed}
///   DeviceMemory::Options o;
///   o.capacity = 64 << 20;  o.kind = PageKind::kDevicePrivate;  o.owner = &my_device;
///   o.name = "emu0";
///   o.evict = [as](DeviceMemory& mem, std::span<const uint64_t> ids) {
///     return MigrateDevicePages(*as, mem, ids);  // copies back, drops the entries' references
///   };
///   auto mem = DeviceMemory::Create(o).value();
///   auto ids = mem->AllocPages(n);               // each page: refcount 1, ours
///   if (!ids.ok()) return ids.status();          // ENOMEM: fall back to system memory
///   ... copy data into mem->PageData(id), dst[i] = migrate_pfn::FromDevice(id);
///   ... MigrateVmaPages / MigrateVmaFinalize: the reference moves into the CPU-side entry;
///   ... mem->SetMapping(id, {as.get(), va}) for each migrated page, so eviction can find it.
/// @endcode
///
/// Lifetime (kernel rule: the pgmap outlives every page reference). DeviceMemory is held by
/// shared_ptr. Shutdown() (the destructor calls it if nobody did) first hands every chunk that
/// still has pages in use to the evict hook, then waits until every page reference has dropped. If
/// references are still held when the timeout expires, it logs an error and the arena mapping is
/// leaked, never unmapped: memory that may still be referenced never becomes a dangling pointer.
/// Holders must still not call GetPage/PutPage on a destroyed DeviceMemory.
///
/// Locking
///   mu_ (the allocator lock) protects the free lists, page states, poison marks, reverse
///   mappings, chunk bookkeeping and statistics. It is a leaf lock: nothing else is taken while it
///   is held, and it is never held while evict or on_free runs. It may be taken from inside
///   mirror/'s locks (PutPage of the last reference runs on_free and then takes it).
///   Reference counts, driver_data and the LRU stamps are atomics: GetPage, PutPage (unless it
///   frees), Touch, DriverData/SetDriverData, PageData and the constant queries take no lock.
///
/// Deliberate non-support: folios are exactly one chunk (no intermediate orders); hugetlb backing
/// is used only for device-private memory (coherent pages are mapped 4 KiB at a time from the
/// memfd, which hugetlbfs does not allow); the arena's system calls are not injectable (the real
/// kernel is always used).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/device_pages.hpp"

namespace hmmkit::driver {

inline constexpr size_t kDevicePageSize = 4096;
inline constexpr size_t kDefaultChunkSize = size_t{2} << 20;

/// Owned by shared_ptr (Create); not copyable. Thread-safe: every method may be called from any
/// thread concurrently, except that the destructor must not race with other calls.
class DeviceMemory final : public DevicePagemap {
 public:
  /// on_free (optional; default: nothing). Called once when the last reference to a page drops
  /// (kernel: dev_pagemap_ops.page_free), with the page id (a folio's head id, once for the whole
  /// folio) and its driver_data. Context: the thread that dropped the last reference, inside
  /// PutPage, which mirror/ may call with its own locks held; no DeviceMemory lock is held. Must
  /// not block, must not call into mirror/, must not allocate from or shut down this DeviceMemory.
  /// The page is not handed out again before on_free returns.
  using FreeFn = std::function<void(uint64_t id, void* driver_data)>;

  /// evict (optional; the default returns ENOTSUP, so a full memory makes allocations fail).
  /// Called with the ids of the pages in use in one chunk (every subpage of a folio); must move
  /// their data to system memory and drop the references the driver's mappings hold (mirror's
  /// MigrateDevicePages does both, using GetMapping to find them). Context: the thread whose
  /// AllocPages/AllocChunk could not be satisfied, or the thread running Shutdown/the destructor;
  /// no DeviceMemory lock is held; may block; may be called concurrently for different chunks;
  /// must not allocate from this DeviceMemory. While it runs, none of the ids is handed to a new
  /// owner. From an allocation it runs in a MigrationNoWaitScope (mirror/migrate.hpp): the
  /// allocating thread may be inside a migration of some of the pages, and another thread's
  /// migration may wait for this eviction, so migrations in flight are not waited for. Returns OK
  /// when done (pages that stay referenced elsewhere are simply not freed); EBUSY or EDEADLK
  /// (pages under migration left in place), after which the allocation evicts another chunk; or
  /// another error, which fails the allocation with ENOMEM.
  using EvictFn = std::function<Status(DeviceMemory& mem, std::span<const uint64_t> ids)>;

  struct Options {
    size_t capacity = 0;                       ///< bytes; a non-zero multiple of chunk_size
    size_t chunk_size = kDefaultChunkSize;     ///< bytes; a power of two, at least 4096
    PageKind kind = PageKind::kDevicePrivate;  ///< kDevicePrivate or kDeviceCoherent
    const void* owner = nullptr;               ///< pgmap owner token (may be null)
    /// Back the arena with 2 MiB pages: MADV_HUGEPAGE on the memfd (shmem THP).
    bool huge_pages = true;
    /// Take the arena from the hugetlb pool instead (MFD_HUGETLB; private memory only, capacity a
    /// multiple of 2 MiB, enough free pages, else the memfd above). Opt-in: the administrator
    /// reserved that pool, and other users of it would find it empty.
    bool hugetlb = false;
    std::string name;  ///< for logs and the memfd name
    /// Memory the driver already has, used as the arena instead of a memfd: `fd` (duplicated;
    /// the caller keeps its own) is mapped MAP_SHARED at `offset` for `capacity` bytes. `keep` is
    /// released after the arena is unmapped (e.g. the GEM object behind the dma-buf). huge_pages
    /// and hugetlb do not apply. Device-coherent memory also needs each page mappable on its own
    /// at offset + id * 4096; Create checks that the fd really maps the page at that offset (some
    /// drivers ignore the offset of a partial mapping) and fails with ENOTSUP otherwise.
    struct External {
      int fd = -1;
      uint64_t offset = 0;
      std::string what;  ///< for the log: "vgem GEM object 3 (dma-buf)"
      std::shared_ptr<void> keep;
    };
    std::optional<External> external;
    FreeFn on_free;
    EvictFn evict;
    /// Eviction rounds one allocation may run before it gives up with ENOMEM (at least 1).
    int evict_rounds = 8;
    /// How long the destructor waits for references when Shutdown was not called.
    std::chrono::milliseconds shutdown_timeout{10000};
  };

  /// Where a page is mapped in a CPU address space; set by the migration code, read by eviction.
  struct Mapping {
    AddressSpace* as = nullptr;  ///< null: not mapped
    uintptr_t va = 0;
  };

  /// A snapshot; counters are cumulative since creation.
  struct Stats {
    size_t capacity = 0;        ///< bytes
    uint64_t pages_total = 0;   ///< capacity / 4096
    uint64_t pages_in_use = 0;  ///< handed out and not yet freed
    uint64_t pages_free = 0;    ///< ready to be handed out (excludes retired pages)
    uint64_t chunks_total = 0;
    uint64_t chunks_in_use = 0;  ///< chunks with at least one page in use
    uint64_t allocations = 0;    ///< pages handed out (a folio counts all its pages)
    uint64_t frees = 0;          ///< pages returned after their last reference dropped
    uint64_t folio_allocations = 0;
    uint64_t folio_splits = 0;
    uint64_t evictions = 0;            ///< chunks handed to the evict hook
    uint64_t evicted_pages = 0;        ///< page ids handed to the evict hook
    uint64_t evict_failures = 0;       ///< evict hook calls that returned an error
    uint64_t alloc_failures = 0;       ///< AllocPages/AllocChunk calls that returned ENOMEM
    uint64_t poisoned_pages = 0;       ///< pages marked poisoned (retired when free)
    uint64_t pages_copied_to_ram = 0;  ///< by CopyToRam: CPU fault-back, eviction, teardown
  };

  /// Creates the arena and the page map. Errors: EINVAL (capacity 0 or not a multiple of
  /// chunk_size, chunk_size not a power of two >= 4096, kind not a device kind, evict_rounds < 1),
  /// the errno of memfd_create/ftruncate/mmap (ENOMEM, EMFILE, ...). Logs which backing was used.
  [[nodiscard]] static Result<std::shared_ptr<DeviceMemory>> Create(const Options& options);

  /// Shutdown(options.shutdown_timeout) unless it already succeeded; see the file comment.
  ~DeviceMemory() override;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  // ---- DevicePagemap ----
  const void* owner() const override { return options_.owner; }
  PageKind kind() const override { return options_.kind; }
  /// Take / drop a reference on the page (on its folio for a subpage of a folio). Lock-free unless
  /// the last reference drops: then on_free runs on this thread and the page goes back to its
  /// chunk under mu_. Never blocks (a SplitFolio in progress on the same folio is waited out by
  /// spinning). Calling either on a page with no reference is a bug: it is logged, and aborts in
  /// debug builds; the count is left alone.
  void GetPage(uint64_t id) override;
  void PutPage(uint64_t id) override;
  /// base() + id * 4096. Never blocks.
  void* PageData(uint64_t id) override;
  /// The default copy (memcpy from the arena), counted in Stats::pages_copied_to_ram.
  Status CopyToRam(std::span<const uint64_t> ids, std::span<void* const> dst) override;
  /// The arena is mapped into the process: pages come back by one kernel copy from it.
  bool HostReadable() const override { return true; }
  void CopiedToRam(size_t pages) override EXCLUDES(mu_);
  /// The arena fd (the memfd, or a duplicate of Options::external's fd); ArenaOffset(id) is
  /// id * 4096 past the arena's start in it. Map with MAP_SHARED.
  int ArenaFd() const override { return fd_; }
  uint64_t ArenaOffset(uint64_t id) const override { return arena_offset_ + id * kDevicePageSize; }

  // ---- geometry (constant) ----
  void* base() const { return base_; }
  size_t capacity() const { return options_.capacity; }
  size_t chunk_size() const { return options_.chunk_size; }
  uint64_t page_count() const { return page_count_; }
  uint64_t chunk_count() const { return chunk_count_; }
  uint32_t pages_per_chunk() const { return pages_per_chunk_; }
  uint64_t ChunkOf(uint64_t id) const { return id / pages_per_chunk_; }
  const std::string& name() const { return options_.name; }
  /// True when the arena is hugetlbfs memory (MFD_HUGETLB), false for a plain memfd.
  bool hugetlb() const { return hugetlb_; }
  /// True when the arena is Options::external memory.
  bool external() const { return options_.external.has_value(); }

  // ---- allocation ----
  /// n pages (not necessarily contiguous), each with refcount 1, owned by the caller, which frees
  /// them with PutPage. Evicts the coldest chunks (up to Options::evict_rounds rounds) when fewer
  /// than n pages are free. Blocks while the evict hook runs or while another thread's eviction
  /// ends. Errors: EINVAL (n == 0), ENOMEM (not enough pages even after eviction, an evict hook
  /// error, n above the capacity, or FailNextAlloc; the message names the capacity and the pages
  /// in use; retryable once memory is freed), ENODEV (Shutdown has begun). On error the caller
  /// holds no page.
  [[nodiscard]] Result<std::vector<uint64_t>> AllocPages(size_t n) EXCLUDES(mu_);
  /// One whole free chunk as a folio (pages_per_chunk() contiguous ids); returns its head (first)
  /// id, with the folio's refcount 1. Evicts as AllocPages does. Errors: ENOMEM (no whole chunk
  /// free even after eviction: callers fall back to AllocPages), ENODEV.
  [[nodiscard]] Result<uint64_t> AllocChunk() EXCLUDES(mu_);
  /// Splits the folio whose head is `head` into independent pages, each with the folio's current
  /// refcount and driver_data. The caller must hold a reference to the folio. Concurrent
  /// GetPage/PutPage on the folio are safe (they wait for the split). Errors: EINVAL (not the head
  /// of an allocated folio).
  [[nodiscard]] Status SplitFolio(uint64_t head) EXCLUDES(mu_);
  /// The head id of the folio holding `id` (id itself for a 4 KiB page). Racy with SplitFolio.
  uint64_t FolioHead(uint64_t id) const;
  /// log2 of the folio's pages: 0 for a 4 KiB page, log2(pages_per_chunk()) for a chunk folio.
  unsigned FolioOrder(uint64_t id) const;
  /// The page's reference count (its folio's for a subpage). For tests and statistics.
  uint32_t RefCount(uint64_t id) const;

  // ---- per-page data ----
  /// driver_data (kernel: zone_device_data). Cleared when the page is freed. Lock-free.
  void SetDriverData(uint64_t id, void* data);
  void* DriverData(uint64_t id) const;
  /// The reverse mapping used by eviction. Cleared when the page is freed. Take mu_ briefly.
  void SetMapping(uint64_t id, Mapping mapping) EXCLUDES(mu_);
  void ClearMapping(uint64_t id) EXCLUDES(mu_);
  Mapping GetMapping(uint64_t id) const EXCLUDES(mu_);

  /// Marks the page's chunk as used now (LRU for eviction). Called by the device on access.
  /// Lock-free; out-of-range ids are ignored.
  void Touch(uint64_t id);

  // ---- device memory failure ----
  /// Retires the page: a free page leaves the free list now, a page in use when its last
  /// reference drops; it is never handed out again (and its chunk never again as a folio).
  /// Idempotent.
  void MarkPoisoned(uint64_t id) EXCLUDES(mu_);
  bool IsPoisoned(uint64_t id) const EXCLUDES(mu_);

  /// Fault injection: the next AllocPages or AllocChunk fails with ENOMEM, once.
  void FailNextAlloc() EXCLUDES(mu_);

  /// Refuses new allocations (ENODEV), hands every chunk with pages in use to the evict hook, then
  /// waits up to `timeout` until no page is referenced. Blocks. Errors: ETIMEDOUT (references are
  /// still held: logged; the arena will be leaked rather than unmapped unless a later Shutdown
  /// succeeds). Idempotent once it succeeded.
  [[nodiscard]] Status Shutdown(std::chrono::milliseconds timeout) EXCLUDES(mu_);

  Stats stats() const EXCLUDES(mu_);

 private:
  enum class PageState : uint8_t {
    kFree,       ///< on its chunk's free list
    kReserved,   ///< taken by an allocation in progress, not yet returned to the caller
    kAllocated,  ///< handed out; referenced
    kRetired,    ///< poisoned and freed: out of circulation
  };
  struct PageMeta {
    Mapping mapping;
    PageState state = PageState::kFree;
    bool poisoned = false;
  };
  enum class ChunkList : uint8_t { kNone, kPartial, kWhole };
  struct ChunkMeta {
    std::vector<uint32_t> free;  ///< offsets in the chunk of its free pages (a stack)
    uint32_t in_use = 0;         ///< reserved + allocated pages
    uint32_t reserved = 0;
    uint32_t poisoned = 0;  ///< pages marked poisoned (in use or retired)
    bool folio = false;     ///< allocated as one folio (AllocChunk), not split
    bool evicting = false;  ///< handed to the evict hook right now: not allocated from
    ChunkList list = ChunkList::kNone;
    uint32_t list_pos = 0;  ///< index in partial_ or whole_
  };
  /// Lock-free per-page state. `ref` holds the count plus the flags below.
  struct PageRef {
    std::atomic<uint32_t> ref{0};
    std::atomic<void*> driver_data{nullptr};
  };
  struct ChunkHot {
    std::atomic<uint64_t> last_use{0};  ///< LRU stamp from clock_
    std::atomic<bool> folio{false};     ///< mirror of ChunkMeta::folio for the lock-free paths
  };
  static constexpr uint32_t kFrozen = 1u << 31;     ///< SplitFolio in progress
  static constexpr uint32_t kFolioHead = 1u << 30;  ///< the count of a whole folio
  static constexpr uint32_t kCountMask = kFolioHead - 1;

  DeviceMemory(const Options& options, int fd, uint64_t arena_offset, void* base, bool hugetlb);

  /// The hooks; a hook that throws terminates the process (the allocator state would be stuck).
  Status CallEvict(std::span<const uint64_t> ids) noexcept;
  void CallOnFree(uint64_t id, void* driver_data) noexcept;

  /// device_memory_refs.cpp
  bool CheckId(uint64_t id, const char* op) const;
  void ReportBug(uint64_t id, const char* what) const;
  /// The last reference to `head` (a page, or a folio when `folio`) dropped.
  void Release(uint64_t head, bool folio) EXCLUDES(mu_);

  /// device_memory_alloc.cpp
  /// One eviction round for an allocation that could not be satisfied; see the .cpp.
  Status EvictRoundLocked(std::vector<uint64_t>& tried, bool need_whole) REQUIRES(mu_);
  bool PickVictimLocked(const std::vector<uint64_t>& tried, bool need_whole, uint64_t* chunk)
      REQUIRES(mu_);
  std::vector<uint64_t> EvictableIdsLocked(uint64_t chunk) REQUIRES(mu_);
  void TakeFreeLocked(size_t n, std::vector<uint64_t>& out) REQUIRES(mu_);
  void UnreserveLocked(std::vector<uint64_t>& ids) REQUIRES(mu_);
  void DropPoisonedReservedLocked(std::vector<uint64_t>& ids) REQUIRES(mu_);
  void ReturnPageLocked(uint64_t id) REQUIRES(mu_);
  void ReclassifyLocked(uint64_t chunk) REQUIRES(mu_);
  void ListRemoveLocked(uint64_t chunk) REQUIRES(mu_);
  void AddInUseLocked(uint64_t chunk, uint32_t n) REQUIRES(mu_);
  void SubInUseLocked(uint64_t chunk, uint32_t n) REQUIRES(mu_);
  void Stamp(uint64_t chunk);
  /// The page-map arrays (registered as hmmkit's internal memory).
  std::vector<std::pair<uintptr_t, size_t>> MetadataSpans() const;
  std::string DescribeLocked() const REQUIRES(mu_);

  /// Set at creation, constant.
  const Options options_;
  const int fd_;
  const uint64_t arena_offset_;
  void* const base_;
  const bool hugetlb_;
  const uint64_t page_count_;
  const uint64_t chunk_count_;
  const uint32_t pages_per_chunk_;
  const unsigned folio_order_;
  const std::unique_ptr<PageRef[]> refs_;  ///< page_count_ entries; atomics
  const std::unique_ptr<ChunkHot[]> hot_;  ///< chunk_count_ entries; atomics
  std::atomic<uint64_t> clock_{0};         ///< LRU clock, advanced by Touch and allocation

  /// The allocator lock (leaf).
  mutable Mutex mu_;
  CondVar cv_;  ///< signalled when pages are freed and when an eviction ends
  std::vector<PageMeta> pages_ GUARDED_BY(mu_);
  std::vector<ChunkMeta> chunks_ GUARDED_BY(mu_);
  std::vector<uint64_t> partial_ GUARDED_BY(mu_);  ///< chunks with free pages, not whole
  std::vector<uint64_t> whole_ GUARDED_BY(mu_);    ///< chunks with every page free
  uint64_t pages_in_use_ GUARDED_BY(mu_) = 0;
  uint64_t pages_free_ GUARDED_BY(mu_) = 0;
  uint64_t chunks_in_use_ GUARDED_BY(mu_) = 0;
  uint64_t evictions_in_flight_ GUARDED_BY(mu_) = 0;
  uint64_t evict_generation_ GUARDED_BY(mu_) = 0;  ///< advanced when an eviction ends
  bool fail_next_alloc_ GUARDED_BY(mu_) = false;
  bool closing_ GUARDED_BY(mu_) = false;     ///< Shutdown began: allocations fail with ENODEV
  bool shut_down_ GUARDED_BY(mu_) = false;   ///< Shutdown succeeded
  bool leak_arena_ GUARDED_BY(mu_) = false;  ///< references outlived a Shutdown timeout
  Stats counters_ GUARDED_BY(mu_);           ///< the cumulative counters of stats()
};

}  // namespace hmmkit::driver
