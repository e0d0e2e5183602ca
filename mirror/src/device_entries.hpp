// DeviceEntries: the CPU-side record of pages that live on a device (the kernel keeps these as
// device-private swap entries in the CPU page table; we keep them here, per AddressSpace), the
// migrations in flight, and the fault handler that turns a CPU touch of such a page into a
// migration back.
//
// Locking: mu_ is a leaf lock. It is never held across a system call that can block on the
// monitor (MADV_DONTNEED, munmap), a DevicePagemap call other than Get/PutPage, or a notifier
// callback.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <set>
#include <span>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/device_pages.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"

namespace hmmkit {

class AddressSpace;

namespace detail {

struct DeviceEntry {
  DevicePagemap* pagemap = nullptr;  // null for exclusive entries
  uint64_t id = 0;
  bool writable = false;
  uint8_t order = 0;  // 9: part of a 2 MiB device folio mapped as a whole (reported as PMD)
  bool exclusive = false;
  const void* exclusive_owner = nullptr;
  void* data = nullptr;  // exclusive: where the bytes are
  std::chrono::steady_clock::time_point migrated_at;
  // Set by Insert, unique per entry: a page migrated back and straight to the device again has a
  // new entry at the same address, which must not be taken for the old one.
  uint64_t generation = 0;
};

// Page-sized staging buffers, carved from 2 MiB mmaps (never malloc: used on the fault path).
class StagingPool {
 public:
  explicit StagingPool(size_t page) : page_(page) {}
  ~StagingPool();
  void* Alloc() EXCLUDES(mu_);
  void Free(void* p) EXCLUDES(mu_);

 private:
  const size_t page_;
  Mutex mu_;
  std::vector<void*> free_ GUARDED_BY(mu_);
  std::vector<void*> slabs_ GUARDED_BY(mu_);
};

class DeviceEntries final : public FaultHandler {
 public:
  explicit DeviceEntries(AddressSpace& as);
  ~DeviceEntries() override;

  AddressSpace& as() { return as_; }
  StagingPool& staging() { return staging_; }

  // ---- entries ----
  size_t Lookup(uintptr_t start, uintptr_t end, std::span<DevicePageInfo> out) EXCLUDES(mu_);
  bool Find(uintptr_t va, DeviceEntry* out) EXCLUDES(mu_);
  // Takes over the caller's page reference.
  void Insert(uintptr_t va, const DeviceEntry& e) EXCLUDES(mu_);
  // Insert for many pages in ascending address order, under one lock hold (a migration commits
  // thousands at once).
  void InsertMany(std::span<const std::pair<uintptr_t, DeviceEntry>> entries) EXCLUDES(mu_);
  // Removes and returns the entry (its reference now the caller's); false when none.
  bool Take(uintptr_t va, DeviceEntry* out) EXCLUDES(mu_);
  // Take, only when the entry at `va` is page `id` of `pagemap` (a migration taking back its own
  // commit: the entry may already have been dropped, and another one put there since).
  bool TakeIfPage(uintptr_t va, const DevicePagemap* pagemap, uint64_t id, DeviceEntry* out)
      EXCLUDES(mu_);
  // Take for many addresses under one lock hold; appends what it took to `out`.
  void TakeMany(std::span<const uintptr_t> vas, std::vector<DeviceEntry>& out) EXCLUDES(mu_);
  // Entries in [start, end), in address order.
  std::vector<std::pair<uintptr_t, DeviceEntry>> Collect(uintptr_t start, uintptr_t end)
      EXCLUDES(mu_);
  // Where `pagemap` page `id` is mapped, or 0.
  uintptr_t AddressOf(const DevicePagemap* pagemap, uint64_t id) EXCLUDES(mu_);
  size_t size() const EXCLUDES(mu_);

  // CPU-side changes seen by the monitor: the pages are gone (unmap, clear) or moved (mremap).
  // Dropped entries release their page (exclusive: their staging memory).
  void DropRange(uintptr_t start, uintptr_t end) EXCLUDES(mu_);
  void MoveRange(uintptr_t from, uintptr_t to, size_t len) EXCLUDES(mu_);

  // ---- migrations in flight: overlapping ranges are serialized ----
  // Waits until no migration overlapping [start, end) is in flight, then records this one.
  // EDEADLK: the calling thread has an overlapping one itself (it would wait for itself). EBUSY:
  // another thread has one and a MigrationNoWaitScope is open on this thread. Nothing recorded.
  [[nodiscard]] Status BeginMigration(uintptr_t start, uintptr_t end) EXCLUDES(mu_);
  void EndMigration(uintptr_t start, uintptr_t end) EXCLUDES(mu_);
  void WaitNoMigration(uintptr_t va) EXCLUDES(mu_);

  // ---- long-term pins ----
  void Pin(uintptr_t start, uintptr_t end) EXCLUDES(mu_);
  void Unpin(uintptr_t start, uintptr_t end) EXCLUDES(mu_);
  bool Pinned(uintptr_t va) EXCLUDES(mu_);

  // Makes sure [start, end) (clipped to its VMA, page-exact) routes missing-page
  // faults here. Errors: ENOTSUP without a monitor, registration errors.
  Status EnsureRouted(uintptr_t start, uintptr_t end) EXCLUDES(mu_);

  // FaultHandler: a CPU touch of a routed page. Context: the monitor's fault thread.
  Status HandleFault(MmMonitor& monitor, const CpuFault& fault) override;

  // Restores exclusive pages in [start, end) (CPU access or a fault request revokes them).
  Status RestoreExclusive(uintptr_t start, uintptr_t end) EXCLUDES(mu_);
  // Moves every device page and exclusive page back to system memory (fork, teardown).
  Status EvictAll() EXCLUDES(mu_);

 private:
  void ReleaseEntry(const DeviceEntry& e);
  void EraseLocked(std::map<uintptr_t, DeviceEntry>::iterator it) REQUIRES(mu_);

  AddressSpace& as_;
  const size_t page_;
  StagingPool staging_;

  mutable Mutex mu_;
  CondVar cv_;                                                // a migration ended
  std::map<uintptr_t, DeviceEntry> entries_ GUARDED_BY(mu_);  // page VA -> entry
  uint64_t next_generation_ GUARDED_BY(mu_) = 1;
  struct PageKey {
    const DevicePagemap* pagemap;
    uint64_t id;
    bool operator==(const PageKey&) const = default;
  };
  struct PageKeyHash {
    size_t operator()(const PageKey& k) const {
      return std::hash<const void*>()(k.pagemap) ^ (k.id * 0x9e3779b97f4a7c15ULL);
    }
  };
  std::unordered_map<PageKey, uintptr_t, PageKeyHash> reverse_ GUARDED_BY(mu_);
  struct InFlight {
    uintptr_t start, end;
    std::thread::id owner;
  };
  std::vector<InFlight> migrating_ GUARDED_BY(mu_);
  std::multiset<std::pair<uintptr_t, uintptr_t>> pins_ GUARDED_BY(mu_);  // may overlap
};

}  // namespace detail
}  // namespace hmmkit
