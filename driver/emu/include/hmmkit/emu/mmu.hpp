/// @file
/// The emulated device's MMU: one device page table, one TLB per compute unit, and the rule that
/// makes mapping changes safe while compute units run.
///
/// Parts:
///   DevicePageTable  the device's radix page table (device_page_table.hpp), owned here.
///   Tlb              one per compute unit (tlb.hpp), owned here.
///   AccessGuard      what a compute unit holds while it translates addresses and touches the
///   memory
///                    they lead to.
///
/// The contract (the kernel's "flush the TLB under the page-table lock", made explicit):
///   When Map, Unmap, Protect, Update or Invalidate returns, (1) every TLB has dropped its entries
///   for the changed range, and (2) no access that used a translation from before the change is
///   still in flight. So after Unmap returns, the driver may free or reuse the memory the range
///   pointed at; after Protect removes write, no device write reaches the range any more.
///
/// How it is kept: the MMU lock (a writer-preferring reader/writer lock, shared_mutex.hpp).
///   - A compute unit calls BeginAccess(cu), which takes the lock shared. Under the guard it calls
///     Translate (TLB hit, else page-table walk and TLB fill) and then reads or writes the memory
///     the translation leads to. It must not use a translation after the guard is released (or
///     after Yield): the translation may be stale by then.
///   - A mapping change takes the lock exclusively: it waits until every guard is released, changes
///     the table, shoots the range down in every TLB, bumps generation(), and releases the lock.
///   - No writer starves: once a change waits, new guards block until it has run. A compute unit
///     holds a guard for a bounded amount of work: one access, or a batch of accesses with
///     ShouldYield()/Yield() between them. A guard held forever blocks every mapping change.
///
/// Rules for callers (misuse aborts with a message where it can be detected):
///   - A compute-unit index is used by one thread at a time (its TLB is not thread-safe).
///   - A thread holds at most one AccessGuard (of any MMU) at a time, and does not call Map, Unmap,
///     Protect, Update, Invalidate, Lookup, ForEach or stats() while it holds one: the lock is not
///     recursive and these would deadlock against a waiting writer.
///   - A compute unit that fails to translate releases its guard BEFORE it raises a device fault
///   and
///     waits for it (fault_queue.hpp): the driver services the fault by calling Map, which waits
///     for every guard.
///
/// Example: a compute unit reads a 64-bit value at device address va (system memory targets only).
///
///   Result<uint64_t> Load(DeviceMmu& mmu, FaultQueue& faults, unsigned cu, uint64_t va) {
///     for (;;) {
///       {
///         DeviceMmu::AccessGuard access = mmu.BeginAccess(cu);
///         Result<Translation> t = access.Translate(va, Access::kRead);
///         if (t.ok()) return *reinterpret_cast<const uint64_t*>(t->CpuAddress(va));
///         if (t.errno_value() == EPERM) return t.status();  // or raise a fault to upgrade
///       }  // guard released: the driver's Map can run
///       Status st = faults.RaiseAndWait({.va = va, .access = Access::kRead, .cu = cu});
///       if (!st.ok()) return st;  // the driver could not map it: report to the kernel's launcher
///     }  // serviced: replay the access
///   }
///
/// Owned by the emulated device (one per device); not copyable. Thread-safe as described above.
/// Destroy it only after every compute unit has released its guard and no change is running.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "hmmkit/base/status.hpp"
#include "hmmkit/base/thread_annotations.hpp"
#include "hmmkit/emu/device_page_table.hpp"
#include "hmmkit/emu/shared_mutex.hpp"
#include "hmmkit/emu/tlb.hpp"

namespace hmmkit::emu {

class DeviceMmu {
 public:
  struct Options {
    unsigned compute_units = 1;                 ///< >= 1; one TLB each
    size_t tlb_entries = Tlb::kDefaultEntries;  ///< per compute unit, >= 1
  };

  /// Sums over all compute units, plus MMU-wide counters.
  struct Stats {
    uint64_t translations = 0;  ///< Translate calls
    uint64_t tlb_hits = 0;
    uint64_t tlb_misses = 0;
    uint64_t walks = 0;              ///< page-table walks (one per TLB miss)
    uint64_t not_mapped = 0;         ///< Translate -> EFAULT
    uint64_t permission_denied = 0;  ///< Translate -> EPERM
    uint64_t changes = 0;            ///< Map/Unmap/Protect/Update/Invalidate that took effect
    uint64_t shootdowns = 0;         ///< TLB shootdown rounds (one per change, over all TLBs)
    uint64_t tlb_entries_invalidated = 0;
    DevicePageTable::Stats table;
  };

  /// What a compute unit holds while it translates and touches memory: the MMU lock, shared.
  /// Obtained from BeginAccess; released by the destructor. Not copyable. Movable, so that a unit
  /// can keep one across accesses (e.g. in a std::optional); the moved-from guard holds nothing
  /// and may only be destroyed. Used (and destroyed) by the thread that created it.
  class [[nodiscard]] AccessGuard {
   public:
    ~AccessGuard();
    AccessGuard(AccessGuard&& other) noexcept : mmu_(other.mmu_), cu_(other.cu_) {
      other.mmu_ = nullptr;
    }
    AccessGuard(const AccessGuard&) = delete;
    AccessGuard& operator=(const AccessGuard&) = delete;
    AccessGuard& operator=(AccessGuard&&) = delete;

    /// Translates device address va for an access of kind `access`: the compute unit's TLB, else a
    /// page-table walk that fills the TLB. The translation is valid until this guard is released
    /// or Yield is called.
    /// Errors: EFAULT when va is not mapped (raise a device fault with `access`, then replay);
    /// EPERM when the leaf lacks RequiredPerms(access) (a fault may upgrade it, or it is final).
    Result<Translation> Translate(uint64_t va, Access access);

    /// True when a mapping change waits for this guard (a hint; see Yield). One relaxed atomic
    /// load, inline: a unit that keeps its guard across accesses asks before each one.
    bool ShouldYield() const { return mmu_->mu_.WriterWaiting(); }
    /// Releases the lock and takes it again, letting a waiting mapping change run first. Every
    /// translation obtained before is void afterwards.
    void Yield();

    unsigned compute_unit() const { return cu_; }

   private:
    friend class DeviceMmu;
    AccessGuard(DeviceMmu& mmu, unsigned cu);

    DeviceMmu* mmu_;  ///< null once moved from
    unsigned cu_;
  };

  explicit DeviceMmu(const Options& options);
  ~DeviceMmu();
  DeviceMmu(const DeviceMmu&) = delete;
  DeviceMmu& operator=(const DeviceMmu&) = delete;

  /// Starts an access by compute unit cu (< compute_units()). Blocks while a mapping change runs or
  /// waits. Aborts when cu is out of range, when cu is already in use by another guard, or when the
  /// calling thread already holds a guard.
  AccessGuard BeginAccess(unsigned cu) EXCLUDES(mu_);

  /// Mapping changes. Each waits for every AccessGuard to be released, changes the page table
  /// (DevicePageTable::Map/Unmap/Protect, same arguments and errors), shoots the range down in
  /// every TLB and bumps generation(); on return, the contract at the top of this file holds. On an
  /// error nothing changed and nothing is shot down. May block; must not be called by a thread
  /// that holds an AccessGuard.
  Status Map(uint64_t va, uint64_t size, const Pte& first) EXCLUDES(mu_);
  Status Unmap(uint64_t va, uint64_t size) EXCLUDES(mu_);
  Status Protect(uint64_t va, uint64_t size, Perm keep_mask) EXCLUDES(mu_);

  /// Several page-table changes as one: runs fn(table) with the lock held exclusively, then shoots
  /// [start, end) down in every TLB, whatever fn returned (it may have changed part of the range).
  /// fn must only change [start, end), must not call back into this MMU, and may not block on a
  /// compute unit. Returns fn's Status; EINVAL (fn not called) for a range that is empty,
  /// unaligned or beyond 2^48.
  Status Update(uint64_t start, uint64_t end, const std::function<Status(DevicePageTable&)>& fn)
      EXCLUDES(mu_);

  /// TLB invalidation without a table change, e.g. after the memory behind a kSystem/kExclusive
  /// translation moved and the table was rewritten through Update with a narrower range. Same
  /// waiting as a change. EINVAL as for Update.
  Status Invalidate(uint64_t start, uint64_t end) EXCLUDES(mu_);
  void InvalidateAll() EXCLUDES(mu_);

  /// A snapshot of the page table, under the lock shared. Must not be called while holding an
  /// AccessGuard.
  std::optional<Translation> Lookup(uint64_t va) const EXCLUDES(mu_);
  /// Calls fn for each mapped leaf overlapping [start, end) under the lock shared; fn must not call
  /// into this MMU.
  void ForEach(uint64_t start, uint64_t end, const DevicePageTable::LeafFn& fn) const EXCLUDES(mu_);

  /// Incremented by every change that took effect (including Invalidate). Lock-free; a compute
  /// unit may compare it across guards to know whether anything changed in between.
  uint64_t generation() const { return generation_.load(std::memory_order_acquire); }

  unsigned compute_units() const { return unsigned(cus_.size()); }

  /// Takes the lock exclusively for a moment (it reads every TLB's counters): do not call while
  /// holding an AccessGuard, and not in a tight loop while compute units run.
  Stats stats() const EXCLUDES(mu_);

 private:
  struct ComputeUnit;

  Result<Translation> TranslateLocked(ComputeUnit& cu, uint64_t va, Access access)
      REQUIRES_SHARED(mu_);
  void ShootdownLocked(uint64_t start, uint64_t end) REQUIRES(mu_);
  void CheckNoGuardHeld(const char* op) const;

  mutable SharedMutex mu_;
  DevicePageTable table_ GUARDED_BY(mu_);
  /// Fixed at construction. Each unit's TLB and counters are written by the unit's own thread under
  /// mu_ shared, and by shootdowns and read by stats() under mu_ exclusive.
  std::vector<std::unique_ptr<ComputeUnit>> cus_;
  std::atomic<uint64_t> generation_{0};
  uint64_t shootdowns_ GUARDED_BY(mu_) = 0;
};

}  // namespace hmmkit::emu
