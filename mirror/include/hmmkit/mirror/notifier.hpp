/// @file
/// Interval notifiers with the kernel's sequence protocol (mmu_interval_notifier).
///
/// A driver inserts an IntervalNotifier over the VA range it mirrors. Whenever the CPU page tables
/// of that range change (munmap, MADV_DONTNEED, mremap, mprotect with interposition, hmmkit's own
/// migrations), the tree calls the subscription's Invalidate before the change is considered done.
///
/// The protocol, exactly as the kernel's:
///
///   again:
///     seq = sub.ReadBegin();               // waits while an invalidation of this sub is in flight
///     RangeFault(...)                      // snapshot/fault pages, no driver lock held
///     lock(driver_lock);
///     if (sub.ReadRetry(seq)) { unlock(driver_lock); goto again; }
///     program the device page table;       // pages are still valid: no invalidation since
///     ReadBegin unlock(driver_lock);
///
///   Invalidate(sub, range, cur_seq):
///     lock(driver_lock);
///     sub.SetSeq(cur_seq);                 // makes any ReadRetry(seq) taken before this fail
///     unmap range from the device, flush the device TLB;
///     unlock(driver_lock);
///
/// RetryLoop (range_fault.hpp) writes the "again" part for you.
///
/// Locking: the tree's mutex (NotifierTree::mu_) protects the tree and the sequence; it is a leaf
/// lock: never held while a callback runs, and callbacks may take any driver lock. The driver lock
/// that pairs SetSeq with ReadRetry is the driver's; hmmkit never takes it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"

namespace hmmkit {

/// Why a range is being invalidated (the kernel's enum mmu_notifier_event).
enum class InvalidateEvent : uint8_t {
  kUnmap,           ///< munmap, mremap away, exit: the range is no longer mapped
  kClear,           ///< pages cleared but the VMA stays (MADV_DONTNEED/REMOVE/FREE/PAGEOUT)
  kProtectionVma,   ///< mprotect changed the VMA's protection (seen with interposition only)
  kProtectionPage,  ///< hmmkit write-protected pages (userfaultfd WP)
  kMigrate,         ///< hmmkit migrates pages; owner = the migrating device's pgmap owner
  kExclusive,       ///< pages become or stop being device-exclusive; owner = the device
  kRelease,         ///< the address space goes away: every subscription is invalidated
};
const char* ToString(InvalidateEvent event);

/// The range handed to Invalidate. Half-open: [start, end).
struct NotifierRange {
  uintptr_t start = 0;
  uintptr_t end = 0;
  InvalidateEvent event = InvalidateEvent::kUnmap;
  /// For kMigrate/kExclusive: the owner token of the device that causes the change, so that a
  /// driver can skip its own events. nullptr otherwise.
  const void* owner = nullptr;
};

class IntervalNotifier;

/// The driver's side of a subscription (kernel: mmu_interval_notifier_ops).
class IntervalNotifierOps {
 public:
  virtual ~IntervalNotifierOps() = default;

  /// Required. Called when `range` (clipped to nothing: it may extend past the subscription)
  /// overlaps the subscription and the CPU page tables of the overlap are changing.
  ///
  /// Context: the thread that raises the invalidation: the MmMonitor's event thread (userfaultfd
  /// events), an application thread inside munmap/mremap/madvise/mprotect/mmap (interposition), or
  /// the thread running a migration. No hmmkit lock is held; the callback may block and allocate.
  /// Obligations: call sub.SetSeq(cur_seq) under the driver lock that guards ReadRetry, and stop
  /// every device access to the overlap before returning (for kUnmap events raised by userfaultfd
  /// the change has already happened; see docs/architecture.md "what the monitor sees"). It may
  /// call NotifierTree::Remove on `sub` (or on any other subscription) and Insert new ones.
  virtual void Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) = 0;
};

/// One subscription. Owned and embedded by the driver; not copyable or movable (the tree keeps its
/// address). Destroying an inserted notifier removes it first.
class IntervalNotifier {
 public:
  IntervalNotifier() = default;
  ~IntervalNotifier();
  IntervalNotifier(const IntervalNotifier&) = delete;
  IntervalNotifier& operator=(const IntervalNotifier&) = delete;

  uintptr_t start() const { return start_; }
  uintptr_t end() const { return end_; }
  bool inserted() const;

  /// Begins a read-side critical section. Returns the sequence to hand to ReadRetry. Blocks while
  /// an invalidation that already called this subscription's Invalidate is still running, so the
  /// caller never starts faulting against a change in progress. Must not be called with the driver
  /// lock held (the invalidation it waits for takes that lock).
  uint64_t ReadBegin();

  /// True when an invalidation hit this subscription since ReadBegin returned `seq`: the pages just
  /// collected may be stale, retry. Call with the driver lock held, the same lock Invalidate holds
  /// around SetSeq; under that lock a false answer stays false until the lock is released.
  bool ReadRetry(uint64_t seq) const {
    return invalidate_seq_.load(std::memory_order_acquire) != seq;
  }
  /// Lock-free early hint, same meaning as ReadRetry; a false answer is not stable.
  bool CheckRetry(uint64_t seq) const { return ReadRetry(seq); }

  /// Called only from Invalidate, with the driver lock held.
  void SetSeq(uint64_t cur_seq) { invalidate_seq_.store(cur_seq, std::memory_order_release); }

 private:
  friend class NotifierTree;
  friend struct NotifierNodeAccess;

  /// Set by Insert, constant while inserted.
  class NotifierTree* tree_ = nullptr;
  IntervalNotifierOps* ops_ = nullptr;
  uintptr_t start_ = 0;
  uintptr_t end_ = 0;
  uint64_t id_ = 0;  ///< insertion order; breaks ties between equal starts

  std::atomic<uint64_t> invalidate_seq_{0};

  /// Tree links; guarded by the tree's mutex.
  IntervalNotifier* left_ = nullptr;
  IntervalNotifier* right_ = nullptr;
  uintptr_t max_end_ = 0;
  uint32_t priority_ = 0;
  bool linked_ = false;
};

/// The subscriptions of one address space (kernel: the interval tree in
/// mmu_notifier_subscriptions). Owned by AddressSpace; thread-safe.
class NotifierTree {
 public:
  NotifierTree() = default;
  ~NotifierTree();
  NotifierTree(const NotifierTree&) = delete;
  NotifierTree& operator=(const NotifierTree&) = delete;

  /// Subscribes `sub` to [start, start + length). Errors: EINVAL for length 0, overflow, or a sub
  /// that is already inserted. Callable from any thread, including from inside an Invalidate
  /// callback; a subscription inserted while an invalidation runs starts "invalidated": its
  /// ReadBegin waits for that invalidation to finish.
  Status Insert(IntervalNotifier& sub, uintptr_t start, size_t length, IntervalNotifierOps& ops)
      EXCLUDES(mu_);

  /// Unsubscribes. After return the tree holds no reference to `sub` and its Invalidate is not
  /// running on any other thread and will not be called again. Called from inside sub's own
  /// Invalidate, it returns at once (the running callback is the caller) and `sub` may be destroyed
  /// once that callback returns. Removing a notifier that is not inserted is a no-op.
  void Remove(IntervalNotifier& sub) EXCLUDES(mu_);

  /// Raises an invalidation: calls Invalidate on every subscription overlapping the range, in
  /// address order, on the calling thread. The tree's sequence stays odd until every concurrent
  /// invalidation has ended. Returns the number of subscriptions called.
  size_t Invalidate(const NotifierRange& range) EXCLUDES(mu_);

  /// Two-phase form for changes that take time (a migration): Start before the change, End after.
  /// ReadBegin of a called subscription waits until End.
  class Scope {
   public:
    Scope(NotifierTree& tree, const NotifierRange& range);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    size_t called() const { return called_; }

   private:
    NotifierTree& tree_;
    size_t called_ = 0;
  };

  size_t size() const EXCLUDES(mu_);
  /// Current sequence; odd while any invalidation runs. For tests and statistics.
  uint64_t seq() const EXCLUDES(mu_);
  /// Number of invalidations raised (each Invalidate or Scope), for statistics.
  uint64_t invalidations() const { return invalidations_.load(std::memory_order_relaxed); }

 private:
  friend class IntervalNotifier;

  uint64_t BeginLocked() REQUIRES(mu_);
  void EndInvalidation() EXCLUDES(mu_);
  size_t CallOverlapping(const NotifierRange& range, uint64_t cur_seq) EXCLUDES(mu_);
  uint64_t ReadBegin(IntervalNotifier& sub) EXCLUDES(mu_);
  void RemoveLocked(IntervalNotifier& sub) REQUIRES(mu_);

  mutable Mutex mu_;
  CondVar cv_;  ///< signalled when an invalidation ends or a callback returns
  IntervalNotifier* root_ GUARDED_BY(mu_) = nullptr;
  size_t count_ GUARDED_BY(mu_) = 0;
  uint64_t seq_ GUARDED_BY(mu_) = 2;  ///< even: idle; odd: invalidating
  unsigned active_ GUARDED_BY(mu_) = 0;
  uint64_t next_id_ GUARDED_BY(mu_) = 1;
  uint32_t rng_ GUARDED_BY(mu_) = 0x9e3779b9u;
  /// Subscriptions whose Invalidate is running, and on which thread (Remove waits on these).
  struct Calling {
    const IntervalNotifier* sub;
    std::thread::id thread;
  };
  std::vector<Calling> calling_ GUARDED_BY(mu_);
  std::atomic<uint64_t> invalidations_{0};
};

}  // namespace hmmkit
